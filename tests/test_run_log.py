"""Watching a run: log.txt, Weights & Biases (offline) and TensorBoard hold one point per step
and per evaluation, also after a stop and a resume; the step line shows the time left and each
evaluation how long it took; wandb and tensorboard are needed only when their flag is on."""
import json
import os
import re
import signal

import pytest
from conftest import (KILL_PRELUDE, SIGTERM_PRELUDE, check_resumed, one_line_error, read_log,
                      read_tensorboard, read_wandb, run, tiny_args, wandb_points)

import train_gpt2

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def points(rows, kind):
    return [(s, v) for s, k, v in rows if k == kind]


def same_points(logged, rows, kind):
    """logged: [(step, value)]: the steps of log.txt's lines of this kind, and their values to
    the digits log.txt keeps (train 6, val and hella 4)."""
    want = points(rows, kind)
    assert [s for s, _ in logged] == [s for s, _ in want], kind
    assert [v for _, v in logged] == pytest.approx([v for _, v in want], abs=1e-6 if kind == "train" else 5e-5)


# -----------------------------------------------------------------------------
# the time left

def test_time_left_is_a_running_mean_of_recent_steps_plus_the_evaluations_left(tmp_path):
    cfg = train_gpt2.TrainConfig(max_steps=100, eval_interval=25, log_dir=str(tmp_path))
    run_log = train_gpt2.RunLog(cfg, str(tmp_path / "log.txt"), 0, master_process=False)
    run_log.val(0, 5.0, seconds=10.0)
    run_log.hella(0, 0.25, seconds=2.0)  # step 0's evaluations: 12 s
    assert run_log.train(0, 5.0, 1e-4, 1.0, dt=50.0, tokens_per_sec=1.0, mfu=None) == "-"  # it compiled
    for step in range(1, 11):
        eta = run_log.train(step, 5.0, 1e-4, 1.0, dt=1.0, tokens_per_sec=1.0, mfu=None)
    # 89 steps of 1 s left, and 4 evaluations of 12 s (steps 25, 50, 75 and the last, 99)
    assert eta == train_gpt2.format_duration(89 + 4 * 12) == "2m17s"
    for step in range(11, 61):  # the last 50 steps take 2 s: the first 10 are out of the mean
        eta = run_log.train(step, 5.0, 1e-4, 1.0, dt=2.0, tokens_per_sec=1.0, mfu=None)
    assert eta == train_gpt2.format_duration(39 * 2 + 2 * 12)
    assert run_log.train(99, 5.0, 1e-4, 1.0, dt=2.0, tokens_per_sec=1.0, mfu=None) == "0s"
    assert [train_gpt2.format_duration(s) for s in (6720, 3599.6, 247, 37.4)] == ["1h52m", "1h00m", "4m07s", "37s"]


# -----------------------------------------------------------------------------
# wandb (offline) and TensorBoard

@pytest.mark.slow
def test_stopped_and_resumed_run_logs_every_step_once_to_wandb_and_tensorboard(data, tmp_path):
    """A run stopped by SIGTERM in step 4's HellaSwag evaluation, after its val loss, and
    resumed: the two offline wandb runs are one run (one id) holding each step's train values
    once, and val, HellaSwag and samples at every evaluation (step 4's val loss once: wandb
    gets a step's values together at its end); TensorBoard holds the same points (the stopped
    run's val loss of step 4 purged); all equal log.txt's."""
    pytest.importorskip("wandb", reason="pip install wandb (.ci/run installs it)")
    pytest.importorskip("tensorboard", reason="pip install tensorboard (.ci/run installs it)")
    log_dir = str(tmp_path / "log")
    flags = dict(vocab_size=50304, block_size=128, hellaswag=1, hellaswag_limit=8, sample=1,
                 peak_tflops=1e-4, wandb="tiny", tensorboard=1)  # evaluations at 0, 4, 7
    # a SIGTERM in the 2nd HellaSwag forward pass (1 per evaluation of 8 examples): step 4's,
    # after its val loss; the run saves model_00004.pt and stops
    p = run(tiny_args(data, log_dir, **flags), prelude=SIGTERM_PRELUDE,
            env={"SIGTERM_AT": "hellaswag.score:2", **OFFLINE})
    assert "stopped by a signal during the HellaSwag evaluation of step 4" in p.stdout
    assert (4, "val") in [(s, k) for s, k, _ in read_log(log_dir)]
    p2 = run(tiny_args(data, log_dir, resume="auto", **flags), env=OFFLINE)
    check_resumed(p2.stdout, 4)
    assert "may already hold" not in p2.stdout
    rows = read_log(log_dir)
    assert [s for s, _ in points(rows, "train")] == list(range(8))

    # the console: the time left on every step line, and how long each evaluation took
    out = p.stdout + p2.stdout
    assert len(re.findall(r"^step +\d+ \|.* \| mfu [\d.]+% \| eta (-|\d+s|\d+m\d\ds)$", out, re.M)) == 8
    assert len(re.findall(r"^validation loss: \d+\.\d{4} \(\d+\.\ds\)$", out, re.M)) == 4  # 4 twice
    assert len(re.findall(r"^HellaSwag accuracy: \d+/8=\d\.\d{4} \(\d+\.\ds\)$", out, re.M)) == 3
    assert len(re.findall(r"^4 samples \(\d+\.\ds\):\nrank 0 sample 0: ", out, re.M)) == 2  # steps 4, 7

    runs = read_wandb(log_dir)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"] and runs[1]["resumed"]
    with open(os.path.join(log_dir, "wandb_run.json")) as f:
        assert json.load(f)["id"] == runs[0]["id"]
    assert runs[0]["config"]["max_steps"] == 8 and runs[0]["config"]["wandb"] == "tiny"
    for key, kind in [("train/loss", "train"), ("val/loss", "val"), ("hellaswag/acc_norm", "hella")]:
        same_points(wandb_points(runs, key), rows, kind)  # each step once
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu"):
        assert [s for s, _ in wandb_points(runs, key)] == list(range(8)), key
    samples = wandb_points(runs, "samples")
    assert [s for s, _ in samples] == [4, 7]
    assert samples[1][1]["_type"] == "table-file"
    with open(runs[1]["dir"] / "files" / samples[1][1]["path"]) as f:
        table = json.load(f)
    console = re.findall(r"^rank 0 sample \d: (.*)$", p2.stdout, re.M)[-4:]  # step 7's
    assert table["data"] == [[7, text] for text in console]

    for tag, kind in [("train/loss", "train"), ("val/loss", "val"), ("hellaswag/acc_norm", "hella")]:
        same_points(read_tensorboard(log_dir, tag), rows, kind)
    assert [s for s, _ in read_tensorboard(log_dir, "train/mfu")] == list(range(8))
    texts = read_tensorboard(log_dir, "samples/text_summary")
    assert [s for s, _ in texts] == [4, 7] and console[0] in texts[1][1]


@pytest.mark.slow
def test_killed_runs_resumed_keep_each_step_once(data, tmp_path):
    """Killed right after saving model_00003.pt, resumed, killed again after step 5, resumed
    from model_00003.pt by 2 processes. TensorBoard: the first run's steps 0-2 are there
    (flushed at every step), the second run's steps 3-5 replaced (purge_step); each step once,
    with log.txt's values. wandb, whose steps only increase: the last run sends steps 6 and 7
    (the second may have sent 3-5), and says why, once."""
    pytest.importorskip("wandb", reason="pip install wandb (.ci/run installs it)")
    pytest.importorskip("tensorboard", reason="pip install tensorboard (.ci/run installs it)")
    log_dir = str(tmp_path / "log")
    flags = dict(wandb="tiny", tensorboard=1)
    for at, resume in [("model_00003.pt", ""), ("model_00006.pt", "auto")]:
        p = run(tiny_args(data, log_dir, resume=resume, **flags), prelude=KILL_PRELUDE, check=False,
                env={"KILL_AT": f"after_save:{at}", **OFFLINE})
        assert p.returncode == -signal.SIGKILL
    check_resumed(p.stdout, 3)  # the second: resumed at step 3, killed after step 5's save
    assert [s for s, _ in points(read_log(log_dir), "train")] == list(range(6))
    p = run(tiny_args(data, log_dir, resume=os.path.join(log_dir, "model_00003.pt"), **flags), env=OFFLINE,
            torchrun=2)
    check_resumed(p.stdout, 3, os.path.join(log_dir, "model_00003.pt"))
    assert p.stdout.count("may already hold steps 3-5") == 1 and "sends from step 6 on" in p.stdout
    rows = read_log(log_dir)
    for tag, kind in [("train/loss", "train"), ("val/loss", "val")]:
        same_points(read_tensorboard(log_dir, tag), rows, kind)
    runs = read_wandb(log_dir)
    assert len(runs) == 3 and runs[0]["id"] == runs[1]["id"] == runs[2]["id"]
    # a killed run may have sent what it logged (wandb writes its file every 15 s: here these
    # runs lost it all); the last run sends none of the second's steps again
    assert [s for s, _ in wandb_points(runs[1:2], "train/loss")] in ([], [3, 4, 5])
    assert [s for s, _ in wandb_points(runs[2:], "train/loss")] == [6, 7]
    with open(os.path.join(log_dir, "wandb_run.json")) as f:
        assert json.load(f)["sent_through"] == 5


@pytest.mark.slow
def test_a_resumed_wandb_run_skips_what_any_earlier_start_may_have_sent(tmp_path):
    """log.txt says how far the stopped run got (step 5), wandb_run.json how far any earlier
    start of the same wandb run got (step 9, then cut back by a resume from an older checkpoint):
    a resume at step 3 sends from step 10 on."""
    pytest.importorskip("wandb", reason="pip install wandb (.ci/run installs it)")
    (tmp_path / "log.txt").write_text("".join(f"{s} train 5.0\n" for s in range(6)))
    (tmp_path / "wandb_run.json").write_text(json.dumps(dict(id="abc123", project="tiny", sent_through=9)))
    code = ("import train_gpt2\n"
            f"cfg = train_gpt2.TrainConfig(wandb='tiny', log_dir={str(tmp_path)!r})\n"
            f"run_log = train_gpt2.RunLog(cfg, {str(tmp_path / 'log.txt')!r}, 3, True)\n"
            "print('sends from', run_log.wandb_from, run_log.wandb.id)\nrun_log.close()\n")
    p = run(["-c", code], script=None, env=OFFLINE)
    assert "may already hold steps 3-9" in p.stdout and "sends from 10 abc123" in p.stdout
    assert json.loads((tmp_path / "wandb_run.json").read_text())["sent_through"] == 9
    assert (tmp_path / "log.txt").read_text() == "0 train 5.0\n1 train 5.0\n2 train 5.0\n"


# -----------------------------------------------------------------------------
# the packages: optional, imported only when asked for

@pytest.mark.slow
@pytest.mark.parametrize("flag, package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_package_fails_at_the_start_in_one_line(data, tmp_path, flag, package):
    hide = f"import sys\nsys.modules[{package!r}] = None  # import {package}: ImportError, as if not installed\n"
    log_dir = tmp_path / "log"
    p = run(tiny_args(data, str(log_dir), **{flag: "tiny" if flag == "wandb" else 1}), prelude=hide,
            check=False)
    one_line_error(p, f"--{flag}", f"pip install {package}", rc=1)
    assert not log_dir.exists()  # before anything was built or written


@pytest.mark.slow
def test_wandb_without_a_login_fails_in_one_line(data, tmp_path):
    pytest.importorskip("wandb", reason="pip install wandb (.ci/run installs it)")
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path)}
    p = run(tiny_args(data, str(tmp_path / "log"), wandb="tiny"), env=env, check=False)
    one_line_error(p, "--wandb tiny:", "wandb login", "WANDB_MODE=offline", rc=1)
