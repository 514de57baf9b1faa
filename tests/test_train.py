"""The trainer end to end: the CLI, the log and checkpoint formats, 1 vs 2 processes, MFU,
torch.compile with evaluation and sampling, HellaSwag across processes."""
import os
import re

import numpy as np
import pytest
import torch
from conftest import (VOCAB, checkpoint_names, make_shards, one_line_error, read_config, read_log,
                      run, tiny_args)

import train_gpt2


def test_cli_end_to_end_log_and_checkpoints(tmp_path, capsys):
    data = make_shards(tmp_path / "data")
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir)) == 0
    out = capsys.readouterr().out
    # derived quantities are printed once at the start
    assert "total batch 256 tokens = 2 x 32 tokens x 1 processes x 4 gradient accumulation steps" in out
    # log.txt: the lecture's format from the first line on (its notebook parses it as is)
    with open(os.path.join(log_dir, "log.txt")) as f:
        lines = f.read().splitlines()
    for line in lines:
        assert re.fullmatch(r"\d+ (train \d+\.\d{6}|val \d+\.\d{4}|hella \d\.\d{4})", line), line
        step, stream, val = line.strip().split()  # the lecture's parser
    rows = read_log(log_dir)
    assert [s for s, k, _ in rows if k == "train"] == list(range(8))
    assert [s for s, k, _ in rows if k == "val"] == [0, 4, 7]  # every eval_interval and the last step
    train_losses = [v for _, k, v in rows if k == "train"]
    assert abs(train_losses[0] - torch.log(torch.tensor(VOCAB)).item()) < 0.3  # close to uniform
    # the run's flags are in config.json
    config = read_config(log_dir)
    assert config["max_steps"] == 8 and config["n_embd"] == 32 and config["log_dir"] == log_dir
    # checkpoints: every checkpoint_interval, before the last step (the lecture's) and after it
    assert checkpoint_names(log_dir) == ["model_00003.pt", "model_00006.pt", "model_00007.pt",
                                         "model_00008.pt"]
    ckpts = {s: torch.load(os.path.join(log_dir, f"model_{s:05d}.pt")) for s in (6, 7, 8)}
    assert ckpts[7]["step"] == 7 and ckpts[8]["step"] == 8
    assert ckpts[7]["config"] == dict(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)
    # a checkpoint's val loss is its own step's, or None where the step was not evaluated
    assert ckpts[7]["val_loss"] == pytest.approx(dict(((s, k), v) for s, k, v in rows)[(7, "val")], abs=1e-4)
    assert ckpts[6]["val_loss"] is None and ckpts[8]["val_loss"] is None
    # the final checkpoint holds the weights after the last step, not those before it
    w7, w8 = ckpts[7]["model"]["lm_head.weight"], ckpts[8]["model"]["lm_head.weight"]
    assert not torch.equal(w7, w8)
    model = train_gpt2.load_model(os.path.join(log_dir, "model_00008.pt"))
    assert torch.equal(model.lm_head.weight.detach(), w8)


def test_keep_checkpoints(tmp_path):
    data = make_shards(tmp_path / "data")
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir, checkpoint_interval=2, keep_checkpoints=2)) == 0
    assert checkpoint_names(log_dir) == ["model_00007.pt", "model_00008.pt"]


def test_max_steps_1_writes_a_checkpoint(tmp_path):
    data = make_shards(tmp_path / "data")
    log_dir = str(tmp_path / "log")
    assert train_gpt2.main(tiny_args(data, log_dir, max_steps=1)) == 0
    assert checkpoint_names(log_dir) == ["model_00001.pt"]
    assert torch.load(os.path.join(log_dir, "model_00001.pt"))["step"] == 1


@pytest.mark.slow
def test_two_processes_equal_one_process_and_mfu_is_per_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) and half the accumulation: the same losses. The
    printed MFU is per process: each one's share of the tokens/s against one chip's peak."""
    data = make_shards(tmp_path / "data")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(tiny_args(data, one, max_steps=6, checkpoint_interval=100))
    p = run(tiny_args(data, two, max_steps=6, checkpoint_interval=100, peak_tflops=1e-4), torchrun=2)
    assert "x 2 processes x 2 gradient accumulation steps" in p.stdout
    assert p.stdout.count("step     0 |") == 1  # only rank 0 prints
    rows1, rows2 = read_log(one), read_log(two)
    assert [(s, k) for s, k, _ in rows1] == [(s, k) for s, k, _ in rows2]
    for (s, k, v1), (_, _, v2) in zip(rows1, rows2):
        assert v1 == pytest.approx(v2, abs=2e-5), (s, k)  # same tokens, summed in another order
    # the shards hold 5, 5 and 6 micro-batches of 64 tokens: odd counts, so the two ranks
    # crossed shard boundaries in the middle of a pair, and 6 x 4 micro-batches wrapped around
    loader = train_gpt2.DataLoaderLite(2, 32, 0, 1, "train", data)
    assert loader.batches_per_shard == [5, 5, 6] and 6 * 4 > sum(loader.batches_per_shard)
    # MFU = (tokens/s / 2 processes) * flops per token / peak, by hand: the model's 43,904
    # parameters (its startup line), 6N = 263,424 plus attention's 12 x 2 layers x 32 channels
    # x T 32 = 24,576: 288,000 FLOPs per token; the peak 1e-4 TFLOPS = 1e8 FLOP/s
    steps = re.findall(r"tok/sec: ([\d.]+) \| mfu ([\d.]+)%", p.stdout)
    assert len(steps) == 6
    for tokens_per_sec, printed in steps:
        want = 100 * (float(tokens_per_sec) / 2) * 288_000 / 1e8
        assert float(printed) == pytest.approx(want, abs=0.051)


@pytest.mark.slow
def test_compiled_run_evaluates_samples_and_agrees_with_eager(tmp_path):
    """--compile 1 keeps val loss, HellaSwag and sampling on (the reference skipped them),
    compiles each shape once, and gives the eager model's numbers; the standalone
    hellaswag.py and sample.py agree with what training printed on the same checkpoint."""
    data = make_shards(tmp_path / "data")
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    common = dict(vocab_size=50304, max_steps=3, eval_interval=1, checkpoint_interval=100,
                  hellaswag=1, hellaswag_limit=8, sample=1)
    p_eager = run(tiny_args(data, eager, compile=0, **common))
    p = run(tiny_args(data, compiled, compile=1, **common), env={"TORCH_LOGS": "recompiles"})
    assert "compile on" in p.stdout
    # one graph for training, then one each for no-grad val, HellaSwag and sampling
    # shapes; the second and third evaluations recompile nothing
    assert p.stderr.count("Recompiling function forward") == 3, p.stderr[-3000:]
    assert p.stdout.count("rank 0 sample 0: Hello, I'm a language model,") == 2  # steps 1, 2
    rows_eager, rows_compiled = read_log(eager), read_log(compiled)
    assert [r[:2] for r in rows_eager] == [r[:2] for r in rows_compiled]
    assert [s for s, k, _ in rows_compiled if k == "hella"] == [0, 1, 2]
    for (s, k, a), (_, _, b) in zip(rows_eager, rows_compiled):
        assert a == pytest.approx(b, abs=2e-4), (s, k)
    # model_00002.pt holds the weights that step 2's evaluation scored and sampled
    ckpt = os.path.join(eager, "model_00002.pt")
    p = run(["--checkpoint", ckpt, "--limit", "8", "-d", "cpu"], script="hellaswag.py")
    acc_norm = [v for s, k, v in rows_eager if (s, k) == (2, "hella")][0]
    assert re.search(rf"acc_norm: \d+/8 = {acc_norm:.4f}", p.stdout), p.stdout
    p = run(["--checkpoint", ckpt, "--device", "cpu"], script="sample.py")
    block = p_eager.stdout.split("step     1 |")[1].split("step     2 |")[0]
    block = block[block.index("rank 0 sample 0: "):]  # the 4 samples of step 2
    assert block.replace("rank 0 sample ", "sample ") == p.stdout


@pytest.mark.slow
def test_hellaswag_two_processes_count_like_one(tmp_path):
    data = make_shards(tmp_path / "data")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = dict(vocab_size=50304, max_steps=1, hellaswag=1, hellaswag_limit=9)
    run(tiny_args(data, one, **common))
    run(tiny_args(data, two, **common), torchrun=2)  # 5 examples on rank 0, 4 on rank 1
    hella = [[(s, v) for s, k, v in read_log(d) if k == "hella"] for d in (one, two)]
    assert hella[0] == hella[1] and len(hella[0]) == 1


# -----------------------------------------------------------------------------
# machines without bfloat16 or without Triton

def test_float16_with_a_gradient_scaler_trains_like_float32(tmp_path, capsys):
    """--dtype float16 (autocast and a GradScaler, for GPUs without bfloat16) follows float32's
    losses to 2e-3 while the loss falls from 6.2 to 3.8 on a learnable stream. Why 2e-3: float16
    rounds at 2**-11 = 4.9e-4 of a value, so the logits (sums of 32 to 128 products) are off by
    about 1e-3 of their size, which moves a loss of 4-6 by well under 1e-3 a step (measured on
    CPU: 4e-5 after 30 steps)."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, VOCAB, 37, dtype=np.uint16)  # a 37-token cycle: easy to learn
    data = tmp_path / "data"
    data.mkdir()
    for i, n in enumerate([1000, 3000, 3000]):
        np.save(data / f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy", np.tile(pattern, 100)[:n])
    losses = {}
    for dtype in ("float32", "float16"):
        assert train_gpt2.main(tiny_args(str(data), str(tmp_path / dtype), max_steps=30, warmup_steps=5,
                                         max_lr=3e-3, min_lr=3e-4, dtype=dtype)) == 0
        losses[dtype] = [v for _, k, v in read_log(tmp_path / dtype) if k == "train"]
    assert "dtype float16 (with a gradient scaler)" in capsys.readouterr().out
    assert losses["float32"][0] - losses["float32"][-1] > 2  # it learns
    for a, b in zip(losses["float32"], losses["float16"]):
        assert a == pytest.approx(b, abs=2e-3)


HIDE_TRITON = "import sys\nsys.modules['triton'] = None  # import triton: ImportError, as on Windows\n"


@pytest.mark.slow
def test_without_triton_compile_auto_runs_eager_and_compile_1_fails_at_start(tmp_path):
    p = run(["-c", HIDE_TRITON + "import train_gpt2\nprint(train_gpt2.pick_compile('auto', 'cuda'))\n"
             "print(train_gpt2.pick_compile('auto', 'cpu'))"], script=None)
    assert p.stdout.splitlines() == [
        "(False, 'auto: torch.compile needs Triton on CUDA, and there is none here')",
        "(False, 'auto: off on cpu')"]
    # --compile 1 on a CUDA machine without Triton: one line before anything is built
    fake_cuda = HIDE_TRITON + "import torch\ntorch.cuda.is_available = lambda: True\n"
    data = make_shards(tmp_path / "data")
    p = run(tiny_args(data, str(tmp_path / "log"), device="cuda", compile=1), prelude=fake_cuda,
            check=False)
    one_line_error(p, "--compile 1: torch.compile needs Triton on CUDA", rc=1)
    assert not os.path.exists(tmp_path / "log")


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_grad_clip_0_leaves_the_gradient_whole(tmp_path, grad_clip):
    """--grad_clip 0: the step takes the whole gradient (its norm, computed here, is the one
    reported); a clip of 1e-3 scales it down to that norm."""
    data = make_shards(tmp_path / "data")
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    optimizer = model.configure_optimizers(0.1, 6e-4, "cpu")
    loader = train_gpt2.DataLoaderLite(2, 32, 0, 1, "train", data)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _, norm = train_gpt2.train_step(model, optimizer, scaler, loader, 2, 6e-4, grad_clip, "cpu", torch.float32)
    stepped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert norm.item() > 0.1  # the tiny model's gradient at its init: far above 1e-3
    assert stepped.item() == pytest.approx(norm.item() if grad_clip == 0 else grad_clip, rel=1e-4)
