"""Resume and data safety: a run killed at any moment and restarted continues as if nothing
happened; nothing a user typed can make a run silently lose or mix up its files."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (KILL_PRELUDE, REPO, checkpoint_names, log_text, make_shards,
                      one_line_error, read_log, run, tiny_args)

import train_gpt2

pytestmark = pytest.mark.slow  # every test here runs the trainer in subprocesses


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def clean_log(data, tmp_path_factory):
    """The uninterrupted 1-process run: 8 steps, checkpoints at 3, 6, 7 and 8."""
    log_dir = str(tmp_path_factory.mktemp("clean"))
    run(tiny_args(data, log_dir))
    return log_text(log_dir)


def killed(data, log_dir, at, torchrun=0, **flags):
    """A run SIGKILLed at `at` (see conftest.KILL_PRELUDE)."""
    return run(tiny_args(data, log_dir, **flags), torchrun=torchrun, prelude=KILL_PRELUDE,
               env={"KILL_AT": at}, check=False)


def files(log_dir):
    """The run's files (not the lock, which each run takes and removes at its end)."""
    return {n: open(os.path.join(log_dir, n), "rb").read() for n in sorted(os.listdir(log_dir))
            if n != "train_gpt2.lock"}


# -----------------------------------------------------------------------------
# exact resume

@pytest.mark.parametrize("log_name", ["log", "runs/lr[3e-4]*"])  # glob characters are literal
def test_sigkill_after_checkpoint_then_resume_is_exact(data, clean_log, tmp_path, log_name):
    log_dir = str(tmp_path / log_name)
    p = killed(data, log_dir, "after_save:model_00003.pt")
    assert p.returncode == -signal.SIGKILL
    assert sorted(os.listdir(log_dir)) == ["config.json", "log.txt", "model_00003.pt", "train_gpt2.lock"]
    p = run(tiny_args(data, log_dir, resume="auto"))
    assert f"resumed from {log_dir}/model_00003.pt at step 3" in p.stdout
    assert log_text(log_dir) == clean_log  # every line is what the uninterrupted run wrote


def test_crash_between_write_and_rename_keeps_previous_checkpoint(data, clean_log, tmp_path):
    log_dir = str(tmp_path / "log")
    p = killed(data, log_dir, "before_rename:model_00006.pt")
    assert p.returncode == -signal.SIGKILL
    # the half-done save is only a .tmp file; the previous checkpoint is intact
    assert sorted(os.listdir(log_dir)) == ["config.json", "log.txt", "model_00003.pt",
                                           "model_00006.pt.tmp", "train_gpt2.lock"]
    assert torch.load(os.path.join(log_dir, "model_00003.pt"))["step"] == 3
    p = run(tiny_args(data, log_dir, resume="auto"))
    assert "model_00003.pt at step 3" in p.stdout
    assert log_text(log_dir) == clean_log
    assert not [n for n in os.listdir(log_dir) if n.endswith(".tmp")]  # the stale one is gone


def test_kill_while_trimming_the_log_loses_nothing(data, clean_log, tmp_path):
    log_dir = str(tmp_path / "log")
    killed(data, log_dir, "after_save:model_00006.pt")
    before = log_text(log_dir)
    assert before.count(" train ") == 6
    # the resumed run dies with the trimmed log written to its temporary name, not renamed
    p = run(tiny_args(data, log_dir, resume=os.path.join(log_dir, "model_00003.pt")),
            prelude=KILL_PRELUDE, env={"KILL_AT": "before_rename:log.txt"}, check=False)
    assert p.returncode == -signal.SIGKILL
    assert log_text(log_dir) == before  # the old log, whole
    run(tiny_args(data, log_dir, resume="auto"))
    assert log_text(log_dir) == clean_log


def test_corrupt_newest_checkpoint_falls_back(data, clean_log, tmp_path):
    log_dir = str(tmp_path / "log")
    killed(data, log_dir, "after_save:model_00006.pt")
    newest = os.path.join(log_dir, "model_00006.pt")
    with open(newest, "r+b") as f:  # cut it short, as a full disk would
        f.truncate(os.path.getsize(newest) // 2)
    p = run(tiny_args(data, log_dir, resume="auto"))
    assert "warning:" in p.stdout and "model_00006.pt is not a readable checkpoint" in p.stdout
    assert "model_00003.pt at step 3" in p.stdout
    assert log_text(log_dir) == clean_log
    # an explicit path to a corrupt file is an error, not a silent fallback
    with open(newest, "r+b") as f:
        f.truncate(100)
    one_line_error(run(tiny_args(data, log_dir, resume=newest), check=False),
                   "is not a readable checkpoint", rc=1)


def test_every_checkpoint_unreadable_is_an_error_and_keeps_the_log(data, tmp_path):
    log_dir = str(tmp_path / "log")
    killed(data, log_dir, "after_save:model_00006.pt")
    for name in ("model_00003.pt", "model_00006.pt"):
        with open(os.path.join(log_dir, name), "r+b") as f:
            f.truncate(1000)
    before = files(log_dir)
    line = one_line_error(run(tiny_args(data, log_dir, resume="auto"), check=False),
                          "no readable checkpoint", "model_00003.pt", "model_00006.pt", rc=1)
    assert "log.txt is untouched" in line
    assert files(log_dir) == before


def test_two_processes_killed_and_resumed_is_exact(data, tmp_path):
    clean, log_dir = str(tmp_path / "clean"), str(tmp_path / "log")
    run(tiny_args(data, clean), torchrun=2)
    p = killed(data, log_dir, "after_save:model_00003.pt", torchrun=2)
    assert p.returncode != 0
    run(tiny_args(data, log_dir, resume="auto"), torchrun=2)
    assert log_text(log_dir) == log_text(clean)


def test_resume_with_another_world_size(data, clean_log, tmp_path):
    """A 2-process checkpoint resumed by 1 process: same stream of tokens, same losses."""
    log_dir = str(tmp_path / "log")
    killed(data, log_dir, "after_save:model_00003.pt", torchrun=2)
    p = run(tiny_args(data, log_dir, resume="auto"))
    assert "written by 2 processes, this run has 1" in p.stdout
    rows = read_log(log_dir)
    clean_rows = [line.split() for line in clean_log.splitlines()]
    assert [(s, k) for s, k, _ in rows] == [(int(s), k) for s, k, _ in clean_rows]
    for (s, k, v), (_, _, clean_v) in zip(rows, clean_rows):
        assert v == pytest.approx(float(clean_v), abs=2e-5), (s, k)


def test_float16_with_gradient_scaler_resumes_exactly(data, tmp_path):
    """--dtype float16: the scaler's state is in the checkpoint, so resume stays exact."""
    clean, log_dir = str(tmp_path / "clean"), str(tmp_path / "log")
    run(tiny_args(data, clean, dtype="float16"))
    killed(data, log_dir, "after_save:model_00003.pt", dtype="float16")
    scaler = torch.load(os.path.join(log_dir, "model_00003.pt"))["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 3  # 3 steps without inf
    run(tiny_args(data, log_dir, dtype="float16", resume="auto"))
    assert log_text(log_dir) == log_text(clean)


# -----------------------------------------------------------------------------
# signals

def start(args):
    return subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py")] + args, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for_training(log_dir, steps=2, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(os.path.join(log_dir, "log.txt")) and log_text(log_dir).count(" train ") >= steps:
            return
        time.sleep(0.1)
    raise AssertionError("the run did not start training")


def test_sigterm_checkpoints_and_exits_cleanly(data, tmp_path):
    log_dir = str(tmp_path / "log")
    p = start(tiny_args(data, log_dir, max_steps=100000, eval_interval=100000,
                        checkpoint_interval=100000))
    wait_for_training(log_dir)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    last = max(s for s, k, _ in read_log(log_dir) if k == "train")
    # the checkpoint holds the state after the last finished step
    assert checkpoint_names(log_dir) == [f"model_{last + 1:05d}.pt"]
    assert torch.load(os.path.join(log_dir, f"model_{last + 1:05d}.pt"))["step"] == last + 1
    assert "stopped by a signal" in out and "--resume auto" in out


def test_second_ctrl_c_stops_at_once_with_one_line(data, tmp_path):
    log_dir = str(tmp_path / "log")
    # 1024 micro-steps a step (seconds): time for two Ctrl-C within one step
    p = start(tiny_args(data, log_dir, max_steps=100000, eval_interval=100000,
                        checkpoint_interval=100000, total_batch_size=65536))
    wait_for_training(log_dir, steps=1)
    p.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two signals at once would reach Python's handler as one
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    p.stderr = err
    line = one_line_error(p, "second Ctrl-C", rc=130)
    assert "no checkpoint" in line
    assert not checkpoint_names(log_dir)


def test_sigterm_before_the_first_step_exits_0(data, tmp_path):
    log_dir = str(tmp_path / "log")
    prelude = ("import os, signal, train_gpt2\nreal = train_gpt2.maybe_resume\n"
               "def resume(*a):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*a)\n"
               "train_gpt2.maybe_resume = resume\n")
    p = run(tiny_args(data, log_dir), prelude=prelude)
    assert "stopped by a signal before the first step; nothing to save" in p.stdout
    assert not checkpoint_names(log_dir) and log_text(log_dir) == ""


def test_sigterm_during_hellaswag_saves_the_step_and_resumes_exactly(data, tmp_path):
    clean, log_dir = str(tmp_path / "clean"), str(tmp_path / "log")
    flags = dict(vocab_size=50304, block_size=128, max_steps=4, eval_interval=2, hellaswag=1,
                 hellaswag_limit=20, checkpoint_interval=100)  # 2 forward passes per evaluation
    run(tiny_args(data, clean, **flags))
    # SIGTERM in the 3rd HellaSwag forward pass: the first of step 2's two
    prelude = ("import os, signal, hellaswag\nreal, calls = hellaswag.score, [0]\n"
               "def score(*a):\n    calls[0] += 1\n    if calls[0] == 3:\n"
               "        os.kill(os.getpid(), signal.SIGTERM)\n    return real(*a)\n"
               "hellaswag.score = score\n")
    p = run(tiny_args(data, log_dir, **flags), prelude=prelude)
    assert "stopped by a signal during the HellaSwag evaluation of step 2" in p.stdout
    assert checkpoint_names(log_dir) == ["model_00002.pt"]
    assert [s for s, k, _ in read_log(log_dir) if k == "hella"] == [0]
    run(tiny_args(data, log_dir, resume="auto", **flags))
    assert log_text(log_dir) == log_text(clean)


# -----------------------------------------------------------------------------
# what a fresh start, --overwrite and a finished run may do to a log folder

def test_fresh_start_over_checkpoints_refuses_and_overwrite_deletes_only_ours(data, tmp_path):
    log_dir = str(tmp_path / "log")
    run(tiny_args(data, log_dir, max_steps=4))
    with open(os.path.join(log_dir, "notes.txt"), "w") as f:
        f.write("mine")
    before = files(log_dir)
    line = one_line_error(run(tiny_args(data, log_dir), check=False), "--resume auto",
                          "--log_dir", "--overwrite 1", rc=1)
    assert log_dir in line
    assert files(log_dir) == before  # nothing touched
    run(tiny_args(data, log_dir, max_steps=2, overwrite=1))
    assert checkpoint_names(log_dir) == ["model_00001.pt", "model_00002.pt"]
    assert files(log_dir)["notes.txt"] == b"mine"
    assert [s for s, k, _ in read_log(log_dir) if k == "train"] == [0, 1]


def test_resume_of_a_finished_run(data, tmp_path):
    log_dir = str(tmp_path / "log")
    run(tiny_args(data, log_dir))  # 8 steps: its newest checkpoint is model_00008.pt
    before = files(log_dir)
    p = run(tiny_args(data, log_dir, resume="auto"))  # the same --max_steps: nothing to do
    assert "finished run" in p.stdout and files(log_dir) == before
    one_line_error(run(tiny_args(data, log_dir, max_steps=6, resume="auto"), check=False),
                   "past --max_steps 6", rc=1)
    assert files(log_dir) == before
    # a longer run continues, and says what the change of --max_steps does
    p = run(tiny_args(data, log_dir, max_steps=10, resume="auto"))
    assert "warning: resuming with other flags" in p.stdout
    assert "--max_steps 8 -> 10 (the cosine schedule now ends at step 10)" in p.stdout
    assert [s for s, k, _ in read_log(log_dir) if k == "train"] == list(range(10))




def test_resume_with_other_model_shape_is_a_clear_error(data, tmp_path):
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir, max_steps=4)) == 0
    one_line_error(run(tiny_args(data, log_dir, n_layer=3, resume="auto"), check=False),
                   "is a different model: n_layer 2 (flags: 3)", rc=1)


def test_resume_auto_without_checkpoint_starts_fresh(data, tmp_path):
    log_dir = str(tmp_path / "log")
    p = run(tiny_args(data, log_dir, max_steps=2, resume="auto"))
    assert "no checkpoint" in p.stdout and "starting fresh" in p.stdout
    assert [s for s, k, _ in read_log(log_dir) if k == "train"] == [0, 1]


def test_keep_checkpoints_never_deletes_the_one_just_written(data, tmp_path):
    """Resuming an early checkpoint of a longer run: --keep_checkpoints counts back from the
    checkpoint being written, not from the abandoned run's later ones."""
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir)) == 0  # checkpoints 3, 6, 7, 8
    assert train_gpt2.main(tiny_args(data, log_dir, max_steps=6, checkpoint_interval=2,
                                     keep_checkpoints=1,
                                     resume=os.path.join(log_dir, "model_00003.pt"))) == 0
    assert checkpoint_names(log_dir) == ["model_00006.pt", "model_00007.pt", "model_00008.pt"]
    assert torch.load(os.path.join(log_dir, "model_00006.pt"))["step"] == 6


def test_checkpoints_past_step_99999_are_found(tmp_path):
    for step in (99999, 100000, 5):
        open(tmp_path / f"model_{step:05d}.pt", "w").close()
    open(tmp_path / "model_100001.pt.tmp", "w").close()
    assert [s for s, _ in train_gpt2.list_checkpoints(str(tmp_path))] == [5, 99999, 100000]
