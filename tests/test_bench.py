"""Tests for bench.py: the ladder's rows on CPU (a tiny model, no torch.compile), the MFU
arithmetic against a hand computation for GPT-2 124M, the command line (its errors are in
test_errors.py)."""
import copy
import json
import math

import pytest
import torch
from conftest import random_tokens, tiny_model

import bench
import train_gpt2

TINY = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--micro_batch_size", "2", "--sequence_length", "32", "--steps", "2", "--warmup_steps", "1"]
KEYS = {"rung", "change", "ms", "tokens_per_sec", "mfu", "memory_gib", "speedup", "loss", "note",
        "tf32", "dtype", "compile", "flash_attention", "vocab_size", "fused"}


def run_main(argv, capsys):
    precision = torch.get_float32_matmul_precision()
    rc = bench.main(argv)
    out, err = capsys.readouterr()
    assert torch.get_float32_matmul_precision() == precision  # main leaves no global change
    return rc, out, err


# -----------------------------------------------------------------------------
# MFU: GPT-2 124M, by hand

def test_mfu_by_hand():
    with torch.device("meta"):  # GPT-2 124M as trained: 12 layers, 12 heads, 768 channels
        model = train_gpt2.GPT(train_gpt2.GPTConfig(vocab_size=50304))
    # 6N = 6 * 124,475,904 = 746,855,424; attention 12 * n_layer * n_head * head_size * T
    # = 12 * 12 * 768 * 1024 = 113,246,208; together 860,101,632 FLOPs per token
    assert train_gpt2.flops_per_token(model, 1024) == 860_101_632
    # 500,000 tokens/s on an H100 (989 TFLOPS): 4.30050816e14 / 9.89e14 = 0.4348
    assert train_gpt2.mfu(500_000, 860_101_632, 989) == pytest.approx(0.4348, abs=1e-4)


def test_peak_table_by_dtype(monkeypatch):
    names = {"cuda:0": "NVIDIA H100 80GB HBM3", "cuda:1": "Tesla V100-SXM2-16GB",
             "cuda:2": "Tesla T4", "cuda:3": "NVIDIA L40S", "cuda:4": "NVIDIA Mystery GPU"}
    monkeypatch.setattr(train_gpt2, "device_name", lambda device: names[device])
    peak = train_gpt2.peak_tflops
    assert peak("cuda:0", torch.bfloat16) == 989 and peak("cuda:0", torch.float32) == 494
    assert peak("cuda:1", torch.bfloat16) is None and peak("cuda:1", torch.float16) == 125
    assert peak("cuda:2", torch.float16) == 65  # the T4: float16 only
    assert peak("cuda:3", torch.bfloat16) == 362  # the L40S, not the L4 or the L40
    assert peak("cuda:4", torch.bfloat16) is None and peak("cpu", torch.float32) is None


def test_explicit_attention_equals_flash_attention():
    """Rungs 1-4 swap in the explicit masked softmax: the same function of the same weights."""
    flash = tiny_model(seed=1, sharpen=0.3).eval()
    explicit = copy.deepcopy(flash)
    for block in explicit.transformer.h:
        block.attn.__class__ = bench.ExplicitAttention
    uniform = copy.deepcopy(explicit)  # control: scores zeroed, the mask kept
    with torch.no_grad():
        for block in uniform.transformer.h:
            block.attn.c_attn.weight[:64].zero_()  # the q and k rows
            block.attn.c_attn.bias[:64].zero_()
    idx = random_tokens((2, 32), 64, seed=3)
    with torch.no_grad():
        a, b, c = flash(idx)[0], explicit(idx)[0], uniform(idx)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - c).abs().max().item() > 0.1  # the attention pattern matters in this test


# -----------------------------------------------------------------------------
# The rungs

def test_rung_settings_are_cumulative():
    everything = list(bench.RUNGS)
    assert bench.rung_settings(1, everything, "cuda") == dict(
        tf32=False, dtype="float32", compile=False, flash_attention=False, vocab_size=50257,
        fused=False)
    assert bench.rung_settings(7, everything, "cuda") == dict(
        tf32=True, dtype="bfloat16", compile=True, flash_attention=True, vocab_size=50304,
        fused=True)
    assert bench.rung_settings(4, everything, "cuda")["flash_attention"] is False
    # a rung left out is left out of the later rungs too: --rungs 1,5 runs 5 uncompiled
    assert bench.rung_settings(5, [1, 5], "cuda") == dict(
        tf32=False, dtype="float32", compile=False, flash_attention=True, vocab_size=50257,
        fused=False)
    # TF32 and fused AdamW do not exist on CPU: never switched on there
    cpu = bench.rung_settings(7, everything, "cpu")
    assert (cpu["tf32"], cpu["fused"]) == (False, False)
    assert (cpu["dtype"], cpu["compile"]) == ("bfloat16", True)


def test_random_loader_is_shifted_and_seeded():
    x, y = bench.RandomLoader(2, 8, seed=0).next_batch()
    assert x.shape == y.shape == (2, 8) and x.dtype == torch.int64
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # y is x shifted by one token
    assert int(x.max()) < 50257
    assert torch.equal(x, bench.RandomLoader(2, 8, seed=0).next_batch()[0])


def test_cpu_ladder_json(capsys):
    rc, out, err = run_main(TINY + ["--rungs", "1,2,3,5,6,7", "--json"], capsys)
    assert rc == 0, err
    rows = json.loads(out)  # nothing but the JSON on stdout
    assert [r["rung"] for r in rows] == [1, 2, 3, 5, 6, 7]
    assert all(set(r) == KEYS for r in rows)
    by_rung = {r["rung"]: r for r in rows}
    for r in (2, 7):  # TF32 and fused AdamW: said so, not timed
        assert by_rung[r]["note"] == "n/a on cpu"
        assert by_rung[r]["ms"] is None and by_rung[r]["speedup"] is None
    assert by_rung[3]["note"] == "cpu autocast"
    for r in (1, 3, 5, 6):
        row = by_rung[r]
        assert row["ms"] > 0 and row["mfu"] is None and row["memory_gib"] is None
        assert row["tokens_per_sec"] == pytest.approx(2 * 32 / (row["ms"] / 1000))
        # the same weights and tokens every rung: a fresh model's loss, about ln(vocab)
        assert abs(row["loss"] - math.log(50257)) < 0.1
    assert by_rung[1]["speedup"] == 1.0
    assert by_rung[5]["flash_attention"] and not by_rung[3]["flash_attention"]
    assert by_rung[6]["vocab_size"] == 50304 and by_rung[5]["vocab_size"] == 50257
    assert not any(r["compile"] for r in rows)  # rung 4 was not chosen
    # fp32 and bf16, explicit and flash attention: the same step within bf16's precision
    assert by_rung[3]["loss"] == pytest.approx(by_rung[1]["loss"], abs=0.02)
    assert by_rung[5]["loss"] == pytest.approx(by_rung[3]["loss"], abs=0.02)


def test_gradient_accumulation_counts_every_micro_batch(capsys, monkeypatch):
    """--grad_accum_steps 3: each step reads 3 micro-batches (counted here), and the tokens/s
    are those of the 3."""
    calls = []
    real = bench.RandomLoader.next_batch
    monkeypatch.setattr(bench.RandomLoader, "next_batch", lambda self: calls.append(1) or real(self))
    rc, out, err = run_main(TINY + ["--rungs", "1", "--grad_accum_steps", "3", "--json"], capsys)
    assert rc == 0, err
    (row,) = json.loads(out)
    assert len(calls) == (1 + 2) * 3  # (warmup + timed steps) x micro-steps
    assert row["tokens_per_sec"] == pytest.approx(3 * 2 * 32 / (row["ms"] / 1000))
    assert abs(row["loss"] - math.log(50257)) < 0.1


@pytest.mark.slow
def test_compile_rung_runs_and_agrees_with_eager(capsys):
    rc, out, err = run_main(TINY + ["--rungs", "1,4", "--json"], capsys)
    assert rc == 0, err
    eager, compiled = json.loads(out)
    assert (eager["compile"], compiled["compile"]) == (False, True) and compiled["ms"] > 0
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=1e-4)  # the same weights and tokens


def test_cpu_ladder_table_with_peak(capsys):
    rc, out, err = run_main(TINY + ["--rungs", "1,2", "--peak_tflops", "0.001"], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 4  # run description, column titles, one row per rung
    assert lines[1].split()[:3] == ["rung", "change", "ms/step"]
    first, tf32 = lines[2].split(), lines[3].split()
    assert first[:2] == ["1", "fp32"] and tf32[-3:] == ["n/a", "on", "cpu"]
    ms, tokens_per_sec = float(first[2]), float(first[3].replace(",", ""))
    mfu_percent = float(first[4])
    assert tokens_per_sec == pytest.approx(64 / (ms / 1000), rel=0.01)
    # by hand: 1,653,760 parameters (wte 1,608,224, wpe 32,768, one block 12,704, ln_f 64),
    # 6N = 9,922,560 plus attention's 12 x 1 layer x 32 channels x T 32 = 12,288: 9,934,848
    # FLOPs per token, against a peak of 0.001 TFLOPS = 1e9 FLOP/s
    assert mfu_percent == pytest.approx(100 * tokens_per_sec * 9_934_848 / 1e9, rel=0.01, abs=0.1)


# -----------------------------------------------------------------------------
# Command line (its mistakes: tests/test_errors.py)

def test_model_sets_the_shape_and_flags_win():
    args = bench.parse_args(["--device", "cpu", "--model", "gpt2-medium", "--n_layer", "2"])
    assert (args.n_layer, args.n_head, args.n_embd) == (2, 16, 1024)
    args = bench.parse_args(["--device", "cpu"])
    assert (args.n_layer, args.n_head, args.n_embd) == (2, 4, 128)  # the CPU default
