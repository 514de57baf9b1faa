"""train_gpt2.py that dies by SIGKILL at a chosen moment, for the resume tests.

    KILL_AT=after_save:model_00003.pt   right after that checkpoint is complete
    KILL_AT=before_rename:model_00006.pt  with the checkpoint written to its temporary
                                          name but not yet renamed

Runs like train_gpt2.py, also under torchrun (only rank 0 saves, so rank 0 dies and
torchrun takes the other ranks down, as when a node is lost)."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2  # noqa: E402

when, name = os.environ["KILL_AT"].split(":")
real_replace, real_save = os.replace, train_gpt2.save_checkpoint


def replace(src, dst):
    if when == "before_rename" and dst.endswith(name):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)


def save_checkpoint(path, checkpoint):
    real_save(path, checkpoint)
    if when == "after_save" and path.endswith(name):
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace
train_gpt2.save_checkpoint = save_checkpoint
sys.exit(train_gpt2.main())
