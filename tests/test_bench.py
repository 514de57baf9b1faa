"""Tests for bench.py: the ladder's rows on CPU (a tiny model, no torch.compile), the MFU
arithmetic against a hand computation for GPT-2 124M, and the command line's errors."""
import json
import math
import subprocess
import sys

import pytest
import torch

import bench
import train_gpt2
from conftest import REPO

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
# MFU and parameter counts: GPT-2 124M, by hand

def test_num_parameters_124m():
    assert train_gpt2.num_parameters(train_gpt2.GPTConfig(vocab_size=50257)) == 124_439_808
    assert train_gpt2.num_parameters(train_gpt2.GPTConfig(vocab_size=50304)) == 124_475_904
    with torch.device("meta"):  # the count from the shapes equals the real model's (no memory)
        model = train_gpt2.GPT(train_gpt2.GPTConfig(vocab_size=50304))
    assert sum(p.numel() for p in model.parameters()) == 124_475_904


def test_mfu_by_hand():
    config = train_gpt2.GPTConfig(vocab_size=50304)  # 12 layers, 12 heads, 768 channels
    # 6N = 6 * 124,475,904 = 746,855,424; attention 12 * n_layer * n_head * head_size * T
    # = 12 * 12 * 768 * 1024 = 113,246,208; together 860,101,632 FLOPs per token
    assert train_gpt2.flops_per_token(config, 1024) == 860_101_632
    # 500,000 tokens/s on an H100 (989 TFLOPS): 4.30050816e14 / 9.89e14 = 0.4348
    assert train_gpt2.mfu(500_000, config, 1024, 989) == pytest.approx(430_050_816e6 / 989e12)
    assert train_gpt2.mfu(500_000, config, 1024, 989) == pytest.approx(0.4348, abs=1e-4)
    assert train_gpt2.peak_tflops("NVIDIA H100 80GB HBM3") == 989


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
    config = train_gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=32)
    assert tokens_per_sec == pytest.approx(64 / (ms / 1000), rel=0.01)
    assert mfu_percent == pytest.approx(100 * train_gpt2.mfu(tokens_per_sec, config, 32, 0.001),
                                        rel=0.01, abs=0.1)


# -----------------------------------------------------------------------------
# Command line: importing runs nothing; mistakes are one line, no traceback

def cli(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_import_runs_nothing():
    out = subprocess.run([sys.executable, "-c", "import bench"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""


@pytest.mark.parametrize("args, rc, message", [
    (["--rungs", "1,8"], 2, "expected rung numbers 1-7"),
    (["--device", "cpu", "--sequence_length", "2048"], 1, "longer than block_size 1024"),
])
def test_cli_errors(args, rc, message):
    result = cli(*args)
    assert result.returncode == rc
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


@pytest.mark.parametrize("args", [["--rungs", "x"], ["--rungs", ""], ["--rungs", "0"]])
def test_bad_rungs_in_process(args, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu"] + args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "expected rung numbers 1-7" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--n_embd", "30", "--n_head", "4"], "--n_embd 30 is not a multiple of --n_head 4"),
    (["--warmup_steps", "-1"], "--warmup_steps must be at least 0"),
    (["--device", "tpu"], "--device must be cuda, mps or cpu, not tpu"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
])
def test_user_errors_in_process(args, message, capsys):
    rc, out, err = run_main(["--device", "cpu"] + args, capsys)
    assert rc == 1 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1
