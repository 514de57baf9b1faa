"""Resume: a run killed at any moment and restarted continues as if nothing happened."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_gpt2
from conftest import REPO
from test_train import make_shards, read_log, run, tiny_args


def log_text(log_dir):
    """log.txt after its header line (the header names the log folder, which differs)."""
    with open(os.path.join(log_dir, "log.txt")) as f:
        header, body = f.read().split("\n", 1)
    assert header.startswith("{"), "the header line was lost"
    return body


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def clean_log(data, tmp_path_factory):
    """The uninterrupted 1-process run: 8 steps, checkpoints at 3, 6, 7."""
    log_dir = str(tmp_path_factory.mktemp("clean"))
    run(tiny_args(data, log_dir))
    return log_text(log_dir)


def test_sigkill_after_checkpoint_then_resume_is_exact(data, clean_log, tmp_path):
    log_dir = str(tmp_path / "log")
    p = run(tiny_args(data, log_dir), script="tests/killable_train.py", check=False,
            env={"KILL_AT": "after_save:model_00003.pt"})
    assert p.returncode == -signal.SIGKILL
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00003.pt"]
    p = run(tiny_args(data, log_dir, resume="auto"))
    assert "resumed from" in p.stdout and "model_00003.pt at step 3" in p.stdout
    # every line of log.txt is what the uninterrupted run wrote
    assert log_text(log_dir) == clean_log


def test_crash_between_write_and_rename_keeps_previous_checkpoint(data, clean_log, tmp_path):
    log_dir = str(tmp_path / "log")
    p = run(tiny_args(data, log_dir), script="tests/killable_train.py", check=False,
            env={"KILL_AT": "before_rename:model_00006.pt"})
    assert p.returncode == -signal.SIGKILL
    # the half-done save is only a .tmp file; the previous checkpoint is intact
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00003.pt", "model_00006.pt.tmp"]
    assert torch.load(os.path.join(log_dir, "model_00003.pt"))["step"] == 3
    p = run(tiny_args(data, log_dir, resume="auto"))
    assert "model_00003.pt at step 3" in p.stdout
    assert log_text(log_dir) == clean_log


def test_corrupt_newest_checkpoint_falls_back(data, clean_log, tmp_path):
    log_dir = str(tmp_path / "log")
    run(tiny_args(data, log_dir), script="tests/killable_train.py", check=False,
        env={"KILL_AT": "after_save:model_00006.pt"})
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
    p = run(tiny_args(data, log_dir, resume=newest), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "is not a readable checkpoint" in p.stderr


def test_two_processes_killed_and_resumed_is_exact(data, tmp_path):
    clean, log_dir = str(tmp_path / "clean"), str(tmp_path / "log")
    run(tiny_args(data, clean), torchrun=2)
    p = run(tiny_args(data, log_dir), torchrun=2, script="tests/killable_train.py", check=False,
            env={"KILL_AT": "after_save:model_00003.pt"})
    assert p.returncode != 0
    run(tiny_args(data, log_dir, resume="auto"), torchrun=2)
    assert log_text(log_dir) == log_text(clean)


def test_resume_with_another_world_size(data, clean_log, tmp_path):
    """A 2-process checkpoint resumed by 1 process: same stream of tokens, same losses."""
    log_dir = str(tmp_path / "log")
    run(tiny_args(data, log_dir), torchrun=2, script="tests/killable_train.py", check=False,
        env={"KILL_AT": "after_save:model_00003.pt"})
    p = run(tiny_args(data, log_dir, resume="auto"))
    assert "written by 2 processes, this run has 1" in p.stdout
    _, rows = read_log(log_dir)
    clean_rows = [line.split() for line in clean_log.splitlines()]
    assert [(s, k) for s, k, _ in rows] == [(int(s), k) for s, k, _ in clean_rows]
    for (s, k, v), (_, _, clean_v) in zip(rows, clean_rows):
        assert v == pytest.approx(float(clean_v), abs=2e-5), (s, k)


def test_sigterm_checkpoints_and_exits_cleanly(data, tmp_path):
    log_dir = str(tmp_path / "log")
    args = tiny_args(data, log_dir, max_steps=100000, eval_interval=100000,
                     checkpoint_interval=100000)
    p = subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py")] + args, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    log_file = os.path.join(log_dir, "log.txt")
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is training
        if os.path.exists(log_file) and log_text(log_dir).count(" train ") >= 2:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    _, rows = read_log(log_dir)
    last = max(s for s, k, _ in rows if k == "train")
    # the checkpoint holds the state after the last finished step
    names = [n for n in os.listdir(log_dir) if n.endswith(".pt")]
    assert names == [f"model_{last + 1:05d}.pt"]
    assert torch.load(os.path.join(log_dir, names[0]))["step"] == last + 1
    assert "stopped by a signal" in out and "--resume auto" in out


def test_resume_with_other_model_shape_is_a_clear_error(data, tmp_path):
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir, max_steps=4)) == 0
    p = run(tiny_args(data, log_dir, n_layer=3, resume="auto"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert "is a different model: n_layer 2 (flags: 3)" in p.stderr


def test_resume_auto_without_checkpoint_starts_fresh(data, tmp_path):
    log_dir = str(tmp_path / "log")
    p = run(tiny_args(data, log_dir, max_steps=2, resume="auto"))
    assert "no checkpoint" in p.stdout and "starting fresh" in p.stdout
    _, rows = read_log(log_dir)
    assert [s for s, k, _ in rows if k == "train"] == [0, 1]


def test_keep_checkpoints_never_deletes_the_one_just_written(data, tmp_path):
    """Resuming an early checkpoint of a longer run: --keep_checkpoints counts back from the
    checkpoint being written, not from the abandoned run's later ones."""
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir)) == 0  # checkpoints 3, 6, 7
    assert train_gpt2.main(tiny_args(data, log_dir, max_steps=6, checkpoint_interval=2,
                                     keep_checkpoints=1,
                                     resume=os.path.join(log_dir, "model_00003.pt"))) == 0
    assert sorted(n for n in os.listdir(log_dir) if n.endswith(".pt")) == \
        ["model_00005.pt", "model_00006.pt", "model_00007.pt"]
    assert torch.load(os.path.join(log_dir, "model_00005.pt"))["step"] == 5


def test_checkpoints_past_step_99999_are_found(tmp_path):
    for step in (99999, 100000, 5):
        open(tmp_path / f"model_{step:05d}.pt", "w").close()
    open(tmp_path / "model_100001.pt.tmp", "w").close()
    assert [s for s, _ in train_gpt2.list_checkpoints(str(tmp_path))] == [5, 99999, 100000]
