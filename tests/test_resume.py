"""Resume and data safety: a run killed at any moment and restarted continues as if nothing
happened; nothing a user typed can make a run silently lose or mix up its files."""
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from conftest import (KILL_PRELUDE, SIGTERM_PRELUDE, VOCAB, check_resumed, checkpoint_names,
                      log_text, one_line_error, read_log, run, start, step_lines, tiny_args)

import train_gpt2


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory):
    """clean(n) -> (log.txt, stdout) of the uninterrupted run on n processes: 8 steps,
    checkpoints at 3, 6, 7 and 8 (made once per module)."""
    runs = {}

    def get(nproc=1, **flags):
        key = (nproc, tuple(sorted(flags.items())))
        if key not in runs:
            log_dir = str(tmp_path_factory.mktemp("clean"))
            p = run(tiny_args(data, log_dir, **flags), torchrun=0 if nproc == 1 else nproc)
            runs[key] = (log_text(log_dir), p.stdout)
        return runs[key]
    return get


@pytest.fixture(scope="module")
def clean_log(clean):
    return clean()[0]


def train_losses(text):
    return [line.split()[2] for line in text.splitlines() if " train " in line]


def killed(data, log_dir, at, torchrun=0, prelude="", **flags):
    """A run SIGKILLed at `at` (see conftest.KILL_PRELUDE)."""
    return run(tiny_args(data, log_dir, **flags), torchrun=torchrun, prelude=prelude + KILL_PRELUDE,
               env={"KILL_AT": at}, check=False)


def files(log_dir):
    """The run's files (not the lock, which each run takes and removes at its end)."""
    return {n: open(os.path.join(log_dir, n), "rb").read() for n in sorted(os.listdir(log_dir))
            if n != "train_gpt2.lock"}


# -----------------------------------------------------------------------------
# exact resume. Each resume below runs with another --seed: a run that silently started over
# would draw other initial weights, and its log.txt would differ from the clean run's.

@pytest.mark.slow
@pytest.mark.parametrize("log_name, at, nproc, left, flags", [
    ("log", "after_save:model_00003.pt", 1, ["model_00003.pt"], {}),
    ("runs/lr[3e-4]*", "after_save:model_00003.pt", 1, ["model_00003.pt"], {}),  # glob characters are literal
    # the half-done save is only a .tmp file; the previous checkpoint is intact
    ("log", "before_rename:model_00006.pt", 1, ["model_00003.pt", "model_00006.pt.tmp"], {}),
    ("log", "after_save:model_00003.pt", 2, ["model_00003.pt"], {}),  # rank 0 dies, torchrun ends rank 1
    # shuffled: the seed orders the data, so the resume keeps it; 24 micro-batches cross an epoch
    ("log", "after_save:model_00003.pt", 1, ["model_00003.pt"], dict(shuffle=1)),
], ids=["after-save", "glob-name", "before-rename", "two-processes", "shuffle"])
def test_sigkill_then_resume_is_exact(data, clean, tmp_path, log_name, at, nproc, left, flags):
    log_dir = str(tmp_path / log_name)
    p = killed(data, log_dir, at, torchrun=0 if nproc == 1 else nproc, **flags)
    assert p.returncode == -signal.SIGKILL if nproc == 1 else p.returncode != 0, p.stderr[-2000:]
    assert sorted(os.listdir(log_dir)) == ["config.json", "log.txt"] + left + ["train_gpt2.lock"]
    assert torch.load(os.path.join(log_dir, "model_00003.pt"))["step"] == 3
    p = run(tiny_args(data, log_dir, resume="auto", **(flags or dict(seed=7))),
            torchrun=0 if nproc == 1 else nproc)
    check_resumed(p.stdout, 3, f"{log_dir}/model_00003.pt")
    clean_log, clean_stdout = clean(nproc, **flags)
    if flags:  # the shuffled run read other batches than the run in order
        assert train_losses(clean_log) != train_losses(clean()[0])
    assert log_text(log_dir) == clean_log  # every line is what the uninterrupted run wrote
    # and the schedule went on where it was: each step's loss and lr as the clean run printed them
    assert step_lines(p.stdout) == step_lines(clean_stdout)[3:]
    assert not [n for n in os.listdir(log_dir) if n.endswith(".tmp")]  # a stale one is gone


@pytest.mark.slow
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
    p = run(tiny_args(data, log_dir, resume="auto", seed=7))
    check_resumed(p.stdout, 6)
    assert log_text(log_dir) == clean_log


def test_a_half_written_last_log_line_is_trimmed_on_resume(tmp_path):
    """A run killed while writing step 10's line left "1" of it: a resume at step 6 keeps the
    whole lines of steps 0-5 only (a kept "1" would glue onto the next line written)."""
    whole = "".join(f"{s} train {9 - s / 10:.6f}\n" + (f"{s} val {9.5 - s / 10:.4f}\n" if s % 4 == 0 else "")
                    for s in range(10))
    (tmp_path / "log.txt").write_text(whole + "1")
    last = train_gpt2.prepare_log_dir(train_gpt2.TrainConfig(log_dir=str(tmp_path)), 6)
    assert last == 9  # how far the stopped run got: its last whole train line
    assert (tmp_path / "log.txt").read_text() == (
        "0 train 9.000000\n0 val 9.5000\n1 train 8.900000\n2 train 8.800000\n3 train 8.700000\n"
        "4 train 8.600000\n4 val 9.1000\n5 train 8.500000\n")


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back(data, clean_log, tmp_path):
    log_dir = str(tmp_path / "log")
    killed(data, log_dir, "after_save:model_00006.pt")
    newest = os.path.join(log_dir, "model_00006.pt")
    with open(newest, "r+b") as f:  # cut it short, as a full disk would
        f.truncate(os.path.getsize(newest) // 2)
    p = run(tiny_args(data, log_dir, resume="auto", seed=7))
    assert "warning:" in p.stdout and "model_00006.pt is not a readable checkpoint" in p.stdout
    check_resumed(p.stdout, 3, f"{log_dir}/model_00003.pt")
    assert log_text(log_dir) == clean_log
    # an explicit path to a corrupt file is an error, not a silent fallback
    with open(newest, "r+b") as f:
        f.truncate(100)
    one_line_error(run(tiny_args(data, log_dir, resume=newest), check=False),
                   "is not a readable checkpoint", rc=1)


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_with_another_world_size(data, clean_log, tmp_path):
    """A 2-process checkpoint resumed by 1 process: same stream of tokens, same losses."""
    log_dir = str(tmp_path / "log")
    killed(data, log_dir, "after_save:model_00003.pt", torchrun=2)
    p = run(tiny_args(data, log_dir, resume="auto", seed=7))
    check_resumed(p.stdout, 3)
    assert "written by 2 processes, this run has 1" in p.stdout
    rows = read_log(log_dir)
    clean_rows = [line.split() for line in clean_log.splitlines()]
    assert [(s, k) for s, k, _ in rows] == [(int(s), k) for s, k, _ in clean_rows]
    for (s, k, v), (_, _, clean_v) in zip(rows, clean_rows):
        assert v == pytest.approx(float(clean_v), abs=2e-5), (s, k)


# GradScaler's first scale 2**21, not 2**16: float16 gradients of the tiny model overflow at
# it, so the scaler skips a step and halves its scale; the checkpoint then holds a scale that a
# fresh scaler does not have
OVERFLOW_PRELUDE = """
import functools, torch
torch.amp.GradScaler.__init__ = functools.partialmethod(torch.amp.GradScaler.__init__, init_scale=2.0 ** 21)
"""


@pytest.mark.slow
def test_float16_with_a_lowered_gradient_scale_resumes_exactly(data, clean, tmp_path):
    """--dtype float16 (on CPU too): the scaler's state is in the checkpoint, so resume stays exact."""
    log_dir = str(tmp_path / "log")
    clean_dir = str(tmp_path / "clean")
    run(tiny_args(data, clean_dir, dtype="float16"), prelude=OVERFLOW_PRELUDE)
    killed(data, log_dir, "after_save:model_00003.pt", prelude=OVERFLOW_PRELUDE, dtype="float16")
    scaler = torch.load(os.path.join(log_dir, "model_00003.pt"))["scaler"]
    assert scaler["scale"] < 2.0 ** 21, scaler  # lowered by an overflow
    p = run(tiny_args(data, log_dir, dtype="float16", resume="auto", seed=7), prelude=OVERFLOW_PRELUDE)
    check_resumed(p.stdout, 3)
    assert log_text(log_dir) == log_text(clean_dir)


def test_every_piece_of_the_checkpointed_state_comes_back(data, tmp_path):
    """save_checkpoint, then maybe_resume into fresh objects: the step, the weights, the AdamW
    moments, the loader position, a gradient scale lowered by a real float16 overflow, and the
    torch, numpy and Python RNG states, each set to what a fresh start would not have."""
    def build(seed):
        torch.manual_seed(seed)
        model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2,
                                                    n_head=2, n_embd=32))
        return (model, model.configure_optimizers(0.1, 6e-4, "cpu"),
                torch.amp.GradScaler("cpu", enabled=True), train_gpt2.DataLoaderLite(2, 32, 0, 1, "train", data))
    model, optimizer, scaler, loader = build(0)
    x, y = loader.next_batch()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(x, y)[1]
    scaler.scale(loss * float("inf")).backward()  # an overflow: the step is skipped, the scale halved
    scaler.step(optimizer)
    scaler.update()
    train_gpt2.train_step(model, optimizer, scaler, loader, 2, 6e-4, 1.0, "cpu", torch.float16)
    assert (scaler.get_scale(), scaler.state_dict()["_growth_tracker"]) == (32768.0, 1)
    loader.set_state(dict(epoch=2, shard=1, batch=4))
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    cfg = train_gpt2.parse_args(tiny_args(data, str(tmp_path), dtype="float16"))
    train_gpt2.save_checkpoint(cfg, 3, model, optimizer, scaler, loader, None, 1, True, print)
    draws = (torch.rand(3), np.random.rand(3), random.random())  # what follows the saved RNG states

    torch.manual_seed(0)  # other RNG states, other weights
    np.random.seed(0)
    random.seed(0)
    model2, optimizer2, scaler2, loader2 = build(1)
    cfg = train_gpt2.parse_args(tiny_args(data, str(tmp_path), dtype="float16", resume="auto"))
    assert train_gpt2.maybe_resume(cfg, model2, optimizer2, scaler2, loader2, print) == 3
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    moments, moments2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert moments.keys() == moments2.keys() and len(moments) == len(list(model.parameters()))
    for i in moments:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[i][k], moments2[i][k]), (i, k)
    assert (scaler2.get_scale(), scaler2.state_dict()["_growth_tracker"]) == (32768.0, 1)
    assert loader2.state_dict() == dict(epoch=2, shard=1, batch=4)
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1]) and random.random() == draws[2]


def tiny_run_checkpoint(data, log_dir):
    """model_00003.pt in log_dir as the tiny run of tiny_args() would save it (its model,
    optimizer, scaler and loader are returned, to resume into)."""
    cfg = train_gpt2.parse_args(tiny_args(data, log_dir))
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    optimizer = model.configure_optimizers(0.1, 6e-4, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = train_gpt2.DataLoaderLite(2, 32, 0, 1, "train", data)
    train_gpt2.save_checkpoint(cfg, 3, model, optimizer, scaler, loader, None, 1, True, print)
    return model, optimizer, scaler, loader


@pytest.mark.parametrize("flags, warning", [
    (dict(warmup_steps=3), "--warmup_steps 2 -> 3 (the schedule's warmup changes)"),
    (dict(max_lr=1e-3), "--max_lr 0.0006 -> 0.001 (the schedule jumps)"),
    (dict(min_lr=1e-5), "--min_lr 6e-05 -> 1e-05 (the schedule jumps)"),
    (dict(shuffle=1), "--shuffle False -> True (the data order changes from here on)"),
    (dict(shuffle=1, seed=5), "--shuffle False -> True (the data order changes from here on); "
                              "--seed 1337 -> 5 (the shuffled data order changes from here on)"),
    (dict(seed=5), None),  # unshuffled, the seed only drew the initial weights, now replaced
], ids=["warmup", "max_lr", "min_lr", "shuffle", "shuffle-and-seed", "seed-unshuffled"])
def test_resume_with_other_flags_warns_once_with_each_effect(data, tmp_path, flags, warning):
    log_dir = str(tmp_path)
    model, optimizer, scaler, loader = tiny_run_checkpoint(data, log_dir)
    lines = []
    cfg = train_gpt2.parse_args(tiny_args(data, log_dir, resume="auto", **flags))
    loader = train_gpt2.DataLoaderLite(2, 32, 0, 1, "train", data, shuffle=cfg.shuffle, seed=cfg.seed)
    assert train_gpt2.maybe_resume(cfg, model, optimizer, scaler, loader, lines.append) == 3
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == ([f"warning: resuming with other flags than the run's: {warning}"] if warning else [])


def test_rng_state_round_trip_through_a_saved_file(tmp_path):
    """rng_state() survives torch.save / torch.load(weights_only) and set_rng_state() puts
    every generator back: the same draws follow."""
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    torch.save(train_gpt2.rng_state(), tmp_path / "rng.pt")
    draws = (torch.randn(4), np.random.randn(4), [random.random() for _ in range(4)])
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    train_gpt2.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.randn(4), draws[0])
    assert np.array_equal(np.random.randn(4), draws[1])
    assert [random.random() for _ in range(4)] == draws[2]


# -----------------------------------------------------------------------------
# signals

def wait_for_training(log_dir, steps=2, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(os.path.join(log_dir, "log.txt")) and log_text(log_dir).count(" train ") >= steps:
            return
        time.sleep(0.1)
    raise AssertionError("the run did not start training")


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigterm_to_rank_1_stops_every_rank_at_the_same_step(data, tmp_path):
    """A SIGTERM that reaches only rank 1 (a scheduler may signal any process): the ranks vote,
    all stop after the same step, rank 0 saves, and torchrun exits 0."""
    log_dir = str(tmp_path / "log")
    p = run(tiny_args(data, log_dir, checkpoint_interval=100), torchrun=2, prelude=SIGTERM_PRELUDE,
            env={"SIGTERM_AT": "train_gpt2.get_lr:4:1"})  # step 3's lr, on rank 1 alone
    assert "stopped by a signal after step 3; continue with --resume auto" in p.stdout
    assert checkpoint_names(log_dir) == ["model_00004.pt"]
    assert [s for s, k, _ in read_log(log_dir) if k == "train"] == [0, 1, 2, 3]


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigterm_before_the_first_step_exits_0(data, tmp_path):
    log_dir = str(tmp_path / "log")
    p = run(tiny_args(data, log_dir), prelude=SIGTERM_PRELUDE, env={"SIGTERM_AT": "train_gpt2.maybe_resume:1"})
    assert "stopped by a signal before the first step; nothing to save" in p.stdout
    assert not checkpoint_names(log_dir) and log_text(log_dir) == ""


@pytest.mark.slow
def test_sigterm_during_hellaswag_saves_the_step_and_resumes_exactly(data, tmp_path):
    clean, log_dir = str(tmp_path / "clean"), str(tmp_path / "log")
    flags = dict(vocab_size=50304, block_size=128, max_steps=4, eval_interval=2, hellaswag=1,
                 hellaswag_limit=20, checkpoint_interval=100)  # 2 forward passes per evaluation
    run(tiny_args(data, clean, **flags))
    # SIGTERM in the 3rd HellaSwag forward pass: the first of step 2's two
    p = run(tiny_args(data, log_dir, **flags), prelude=SIGTERM_PRELUDE, env={"SIGTERM_AT": "hellaswag.score:3"})
    assert "stopped by a signal during the HellaSwag evaluation of step 2" in p.stdout
    assert checkpoint_names(log_dir) == ["model_00002.pt"]
    assert [s for s, k, _ in read_log(log_dir) if k == "hella"] == [0]
    p = run(tiny_args(data, log_dir, resume="auto", seed=7, **flags))
    check_resumed(p.stdout, 2)
    assert log_text(log_dir) == log_text(clean)


# -----------------------------------------------------------------------------
# what a fresh start, --overwrite and a finished run may do to a log folder

@pytest.mark.slow
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


@pytest.mark.slow
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
    check_resumed(p.stdout, 8)
    assert "warning: resuming with other flags" in p.stdout
    assert "--max_steps 8 -> 10 (the cosine schedule now ends at step 10)" in p.stdout
    assert [s for s, k, _ in read_log(log_dir) if k == "train"] == list(range(10))




@pytest.mark.slow
def test_resume_with_other_model_shape_is_a_clear_error(data, tmp_path):
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir, max_steps=4)) == 0
    one_line_error(run(tiny_args(data, log_dir, n_layer=3, resume="auto"), check=False),
                   "is a different model: n_layer 2 (flags: 3)", rc=1)


@pytest.mark.slow
def test_resume_auto_without_checkpoint_starts_fresh(data, tmp_path):
    log_dir = str(tmp_path / "log")
    p = run(tiny_args(data, log_dir, max_steps=2, resume="auto"))
    assert "no checkpoint" in p.stdout and "starting fresh" in p.stdout
    assert [s for s, k, _ in read_log(log_dir) if k == "train"] == [0, 1]


def test_keep_checkpoints_never_deletes_the_one_just_written(data, tmp_path, capsys):
    """Resuming an early checkpoint of a longer run: --keep_checkpoints counts back from the
    checkpoint being written, not from the abandoned run's later ones."""
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir)) == 0  # checkpoints 3, 6, 7, 8
    capsys.readouterr()
    assert train_gpt2.main(tiny_args(data, log_dir, max_steps=6, checkpoint_interval=2,
                                     keep_checkpoints=1,
                                     resume=os.path.join(log_dir, "model_00003.pt"))) == 0
    check_resumed(capsys.readouterr().out, 3)
    assert checkpoint_names(log_dir) == ["model_00006.pt", "model_00007.pt", "model_00008.pt"]
    assert torch.load(os.path.join(log_dir, "model_00006.pt"))["step"] == 6


def test_checkpoints_past_step_99999_are_found(tmp_path):
    for step in (99999, 100000, 5):
        open(tmp_path / f"model_{step:05d}.pt", "w").close()
    open(tmp_path / "model_100001.pt.tmp", "w").close()
    assert [s for s, _ in train_gpt2.list_checkpoints(str(tmp_path))] == [5, 99999, 100000]
