"""The trainer end to end: CLI, log and checkpoint formats, bad input, 1 vs 2 processes."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt2
from conftest import REPO

VOCAB = 512  # tiny vocabulary: the shards below hold random ids < VOCAB


def make_shards(root, n_train=3, seed=0):
    """A val shard and n_train train shards of random tokens, lengths not multiples of B*T."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    np.save(os.path.join(root, "edufineweb_val_000000.npy"),
            rng.integers(0, VOCAB, 1000, dtype=np.uint16))
    for i in range(1, n_train + 1):
        np.save(os.path.join(root, f"edufineweb_train_{i:06d}.npy"),
                rng.integers(0, VOCAB, 300 + 37 * i, dtype=np.uint16))
    return str(root)


def tiny_args(data_root, log_dir, **overrides):
    """A tiny model and batch: 2 x 32 tokens per micro-batch, 256 tokens per step."""
    args = dict(device="cpu", n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=VOCAB,
                micro_batch_size=2, sequence_length=32, total_batch_size=256, max_steps=8,
                warmup_steps=2, eval_interval=4, val_steps=3, hellaswag=0, sample=0,
                checkpoint_interval=3, data_root=data_root, log_dir=log_dir)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def run(args, torchrun=0, env=None, check=True, script="train_gpt2.py", timeout=300):
    """Run a script as a user would: python, or torchrun with `torchrun` processes on CPU."""
    cmd = [sys.executable, str(REPO / script)] + args
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun}", str(REPO / script)] + args
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def read_log(log_dir):
    """(header dict, list of (step, kind, value)) from log.txt."""
    with open(os.path.join(log_dir, "log.txt")) as f:
        lines = f.read().splitlines()
    rows = [(int(s), k, float(v)) for s, k, v in (line.split() for line in lines[1:])]
    return json.loads(lines[0]), rows


def test_cli_end_to_end_log_and_checkpoints(tmp_path, capsys):
    data = make_shards(tmp_path / "data")
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir)) == 0
    out = capsys.readouterr().out
    # derived quantities are printed once at the start
    assert "total batch 256 tokens = 2 x 32 tokens x 1 processes x 4 gradient accumulation steps" in out
    header, rows = read_log(log_dir)
    assert header["max_steps"] == 8 and header["n_embd"] == 32
    with open(os.path.join(log_dir, "log.txt")) as f:
        body = f.read().splitlines()[1:]
    for line in body:  # the SPEC's formats, digit for digit
        assert re.fullmatch(r"\d+ (train \d+\.\d{6}|val \d+\.\d{4}|hella \d\.\d{4})", line), line
    assert [s for s, k, _ in rows if k == "train"] == list(range(8))
    assert [s for s, k, _ in rows if k == "val"] == [0, 4, 7]  # every eval_interval and the last step
    train_losses = [v for _, k, v in rows if k == "train"]
    assert abs(train_losses[0] - np.log(VOCAB)) < 0.3  # a fresh model is close to uniform
    # checkpoints at multiples of checkpoint_interval (not 0) and at the last step
    names = sorted(p for p in os.listdir(log_dir) if p.endswith(".pt"))
    assert names == ["model_00003.pt", "model_00006.pt", "model_00007.pt"]
    ckpt = torch.load(os.path.join(log_dir, "model_00007.pt"))  # the safe default loads it
    assert ckpt["step"] == 7
    assert ckpt["config"] == dict(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32,
                                  flash_attention=True)
    assert ckpt["val_loss"] == pytest.approx(rows[-2][2], abs=1e-4)  # the val loss of step 7
    model = train_gpt2.model_from_checkpoint(os.path.join(log_dir, "model_00007.pt"))
    assert model.config.n_layer == 2


def test_keep_checkpoints(tmp_path):
    data = make_shards(tmp_path / "data")
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir, checkpoint_interval=2, keep_checkpoints=2)) == 0
    assert sorted(p for p in os.listdir(log_dir) if p.endswith(".pt")) == \
        ["model_00006.pt", "model_00007.pt"]


@pytest.mark.parametrize("case, expect", [
    ("no_folder", "run `python fineweb.py` first"),
    ("no_val", "no val shards"),
    ("bad_dtype", "not a 1-D uint16 token shard"),
    ("batch", "not divisible by B*T*world_size"),
    ("seq", "longer than --block_size"),
    ("flag", "unrecognized arguments: --learning_rate"),
    ("bool", "expected 1/0/true/false"),
    ("interval", "--eval_interval must be at least 1"),
])
def test_bad_input_one_line_no_traceback(tmp_path, case, expect):
    data = make_shards(tmp_path / "data")
    args = tiny_args(data, str(tmp_path / "log"))
    if case == "no_folder":
        args.append(f"--data_root={tmp_path / 'missing'}")
    elif case == "no_val":
        os.remove(os.path.join(data, "edufineweb_val_000000.npy"))
    elif case == "bad_dtype":
        np.save(os.path.join(data, "edufineweb_train_000002.npy"), np.zeros(900, dtype=np.int32))
    elif case == "batch":
        args.append("--total_batch_size=300")
    elif case == "seq":
        args.append("--sequence_length=128")
    elif case == "flag":
        args.append("--learning_rate=1")
    elif case == "bool":
        args.append("--sample=maybe")
    elif case == "interval":
        args.append("--eval_interval=0")
    p = run(args, check=False)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], p.stderr
    if case == "bad_dtype":
        assert "edufineweb_train_000002.npy" in lines[0]  # names the file


def test_two_processes_equal_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) and half the accumulation: the same losses."""
    data = make_shards(tmp_path / "data")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(tiny_args(data, one, max_steps=6, checkpoint_interval=100))
    p = run(tiny_args(data, two, max_steps=6, checkpoint_interval=100), torchrun=2)
    assert "x 2 processes x 2 gradient accumulation steps" in p.stdout
    assert p.stdout.count("step     0 |") == 1  # only rank 0 prints
    _, rows1 = read_log(one)
    _, rows2 = read_log(two)
    assert [(s, k) for s, k, _ in rows1] == [(s, k) for s, k, _ in rows2]
    for (s, k, v1), (_, _, v2) in zip(rows1, rows2):
        assert v1 == pytest.approx(v2, abs=2e-5), (s, k)  # same tokens, summed in another order
    # the shards hold 5, 5 and 6 micro-batches of 64 tokens: odd counts, so the two ranks
    # crossed shard boundaries in the middle of a pair, and 6 x 4 micro-batches wrapped around
    loader = train_gpt2.DataLoaderLite(2, 32, 0, 1, "train", data)
    assert loader.batches_per_shard == [5, 5, 6] and 6 * 4 > sum(loader.batches_per_shard)


def hella_rows(log_dir):
    return [(s, v) for s, k, v in read_log(log_dir)[1] if k == "hella"]


@pytest.fixture
def hella_env(tiktoken_cache, hellaswag_val_file, monkeypatch):
    monkeypatch.setenv("HELLASWAG_DIR", str(hellaswag_val_file.parent))


def test_compiled_run_evaluates_samples_and_agrees_with_eager(tmp_path, hella_env):
    """--compile 1 keeps val loss, HellaSwag and sampling on (the reference skipped them),
    compiles each shape once, and gives the eager model's numbers; the standalone
    hellaswag.py agrees with the in-training figure on the same checkpoint."""
    data = make_shards(tmp_path / "data")
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    common = dict(vocab_size=50304, max_steps=3, eval_interval=1, checkpoint_interval=100,
                  hellaswag=1, hellaswag_limit=8, sample=1)
    run(tiny_args(data, eager, compile=0, **common))
    p = run(tiny_args(data, compiled, compile=1, **common), env={"TORCH_LOGS": "recompiles"})
    assert "compile on" in p.stdout
    # one graph for training, then one each for no-grad val, HellaSwag and sampling
    # shapes; the second and third evaluations recompile nothing
    assert p.stderr.count("Recompiling function forward") == 3, p.stderr[-3000:]
    assert p.stdout.count("rank 0 sample 0: Hello, I'm a language model,") == 2  # steps 1, 2
    _, rows_eager = read_log(eager)
    _, rows_compiled = read_log(compiled)
    assert [r[:2] for r in rows_eager] == [r[:2] for r in rows_compiled]
    assert [s for s, k, _ in rows_compiled if k == "hella"] == [0, 1, 2]
    for (s, k, a), (_, _, b) in zip(rows_eager, rows_compiled):
        assert a == pytest.approx(b, abs=2e-4), (s, k)
    # the last checkpoint holds the weights that the last evaluation scored
    p = run(["--checkpoint", os.path.join(eager, "model_00002.pt"), "--limit", "8", "-d", "cpu"],
            script="hellaswag.py")
    acc_norm = dict(hella_rows(eager))[2]
    assert re.search(rf"acc_norm: \d+/8 = {acc_norm:.4f}", p.stdout), p.stdout


def test_hellaswag_two_processes_count_like_one(tmp_path, hella_env):
    data = make_shards(tmp_path / "data")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = dict(vocab_size=50304, max_steps=1, hellaswag=1, hellaswag_limit=9)
    run(tiny_args(data, one, **common))
    run(tiny_args(data, two, **common), torchrun=2)  # 5 examples on rank 0, 4 on rank 1
    assert hella_rows(one) == hella_rows(two) and len(hella_rows(one)) == 1
