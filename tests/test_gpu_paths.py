"""The GPU paths, checked on a CPU: the dtype each GPU generation gets (the device queries
mocked), --device cuda:N under torchrun, what torch.compile compiles on 1 process, under DDP
and under FSDP."""
import os

import pytest
import torch

import train_gpt2

# -----------------------------------------------------------------------------
# one dtype picker: bfloat16 only where the run's own GPU computes in it


@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA machine whose GPUs have the compute capability set in the returned dict;
    records which device each capability query named. torch.cuda.is_bf16_supported() says
    True, as torch's does on a V100 or T4 (emulated bfloat16 counts by default)."""
    state = dict(capability=(8, 0), asked=[])

    def capability(device=None):
        state["asked"].append(device)
        return state["capability"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    return state


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_bfloat16_only_from_ampere_on_the_runs_own_gpu(gpu, capability, expected):
    """V100 (7.0) and T4 (7.5): float16 with a gradient scaler; A100 (8.0), H100 (9.0): bfloat16.
    The capability asked is the run's device's (cuda:1), not the current device's."""
    gpu["capability"] = capability
    dtype, why = train_gpt2.pick_dtype("auto", "cuda:1")
    assert dtype == expected, why
    assert gpu["asked"] == ["cuda:1"]
    assert ("gradient scaler" in why) == (expected == torch.float16), why
    # the trainer's scaler is on exactly for float16
    assert torch.amp.GradScaler("cpu", enabled=dtype == torch.float16).is_enabled() == (expected == torch.float16)


def test_auto_dtype_off_cuda_and_explicit_choices(gpu):
    assert train_gpt2.pick_dtype("auto", "cpu")[0] == torch.float32
    assert train_gpt2.pick_dtype("auto", "mps")[0] == torch.float32
    gpu["capability"] = (7, 0)
    assert train_gpt2.pick_dtype("bfloat16", "cuda")[0] == torch.bfloat16  # asked for: given
    assert gpu["asked"] == []


def test_rocm_counts_as_bfloat16(gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    gpu["capability"] = (7, 0)
    assert train_gpt2.pick_dtype("auto", "cuda")[0] == torch.bfloat16


def test_sample_py_uses_trainings_dtype(gpu, monkeypatch, capsys):
    """sample.py hard-coded bfloat16 on any GPU: on a T4 it now samples in float16."""
    import sample
    from conftest import tiny_model
    seen = []
    monkeypatch.setattr(train_gpt2, "pick_device", lambda name: "cuda:1")
    monkeypatch.setattr(train_gpt2, "load_model", lambda *a, **k: tiny_model(vocab_size=50304))
    monkeypatch.setattr(sample, "sample", lambda *a: seen.append(a[8]) or torch.zeros(1, 2, dtype=torch.long))
    for capability, expected in [((7, 5), torch.float16), ((9, 0), torch.bfloat16)]:
        gpu["capability"] = capability
        assert sample.main(["--checkpoint", "x.pt"]) == 0
        assert seen.pop() == expected
    assert sample.main(["--checkpoint", "x.pt", "--dtype", "float32"]) == 0
    assert seen.pop() == torch.float32


def test_hellaswag_py_dtype_auto_is_trainings(gpu, monkeypatch, capsys):
    import hellaswag
    from conftest import tiny_model
    seen = []
    precision = torch.get_float32_matmul_precision()
    monkeypatch.setattr(train_gpt2, "pick_device", lambda name: "cuda:1")
    monkeypatch.setattr(train_gpt2, "load_model", lambda *a, **k: tiny_model(vocab_size=50304))
    monkeypatch.setattr(hellaswag, "evaluate", lambda *a, **k: seen.append(k["autocast_dtype"]) or (1, 1, 2))
    try:
        gpu["capability"] = (7, 0)
        assert hellaswag.main(["--checkpoint", "x.pt", "--limit", "2", "--dtype", "auto"]) == 0
        assert seen.pop() == torch.float16
        assert hellaswag.main(["--checkpoint", "x.pt", "--limit", "2"]) == 0  # the reference's float32
        assert seen.pop() == torch.float32
    finally:
        torch.set_float32_matmul_precision(precision)


def test_bench_rung_3_is_float16_with_a_scaler_on_a_gpu_without_bfloat16(gpu, monkeypatch):
    import bench
    seen = []
    monkeypatch.setattr(bench, "run_rung", lambda args, settings: seen.append(settings["dtype"]) or (1.0, 1.0, None, 1.0))
    monkeypatch.setattr(bench, "peak_tflops", lambda device, dtype: None)
    args = bench.parse_args(["--device", "cpu", "--rungs", "1,3"])
    args.device = "cuda:0"
    for capability, half in [((7, 5), "float16"), ((8, 0), "bfloat16")]:
        gpu["capability"] = capability
        rows = list(bench.ladder(args))
        assert seen[-2:] == ["float32", half]
        assert ("scaler" in rows[1]["note"]) == (half == "float16")


# -----------------------------------------------------------------------------
# --device cuda:N under torchrun: every rank would take that GPU (NCCL: "Duplicate GPU")

@pytest.mark.parametrize("device, world_size, refused", [("cuda:1", 2, True), ("cuda:0", 8, True),
                                                         ("cuda:1", 1, False), ("cpu", 2, False)])
def test_device_with_an_index_under_torchrun_is_refused(gpu, monkeypatch, device, world_size, refused):
    from conftest import tiny_args
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(train_gpt2, "pick_compile", lambda value, device_type: (False, "--compile"))
    args = tiny_args("data", "log", device=device, total_batch_size=64 * 8)
    if refused:
        with pytest.raises(train_gpt2.UserError, match=f"--device {device} under torchrun: .*--device cuda"):
            train_gpt2.parse_args(args)
    else:
        assert train_gpt2.parse_args(args).device == device


# -----------------------------------------------------------------------------
# what --compile compiles: the whole model on 1 process and DDP, each block under FSDP

# Before train_gpt2 runs: torch.compile with a backend that notes which weights each graph
# takes (a block's c_attn, the root's wte) and then runs it as aot_eager (Dynamo and AOT
# autograd, as Inductor gets them, without generating code); at exit Dynamo's frame counts.
COUNT_GRAPHS = """
import atexit, json, os, torch, torch._dynamo
from torch._dynamo.utils import counters
graphs = []
def noting_backend(gm, example_inputs):
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"] + [n for n, _ in gm.named_parameters()]
    graphs.append(sorted({w for w in ("c_attn", "wte") if any(w in str(n) for n in names)}))
    return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
real_compile = torch.compile
torch.compile = lambda *args, **kw: real_compile(*args, **{**kw, "backend": noting_backend})
atexit.register(lambda: print("DYNAMO " + json.dumps(dict(rank=int(os.environ.get("RANK", 0)),
    frames=dict(counters["frames"]), graphs=graphs)), flush=True))
"""


@pytest.mark.slow
@pytest.mark.parametrize("activation_checkpointing", [0, 1])
@pytest.mark.parametrize("launch", ["1 process", "ddp", "fsdp"])
def test_compile_compiles_every_block_and_skips_no_frame(tmp_path, launch, activation_checkpointing):
    """Under FSDP, compiling the whole model compiled only the blocks (GPT.forward's frame
    skipped), and with activation checkpointing nothing. Now every launch compiles its blocks
    with no frame skipped; 1 process and DDP compile the root with them (one graph holds wte
    and the blocks), FSDP runs the root eager. The checkpoint's names carry no _orig_mod."""
    import json

    from conftest import make_shards, run, tiny_args
    data = make_shards(tmp_path / "data")
    log_dir = str(tmp_path / "log")
    args = tiny_args(data, log_dir, max_steps=2, eval_interval=1, compile=1, fsdp=int(launch == "fsdp"),
                     activation_checkpointing=activation_checkpointing)
    p = run(args, torchrun=0 if launch == "1 process" else 2, prelude=COUNT_GRAPHS)
    reports = [json.loads(line[len("DYNAMO "):]) for line in p.stdout.splitlines() if line.startswith("DYNAMO ")]
    assert len(reports) == (1 if launch == "1 process" else 2), p.stdout[-3000:]
    for r in reports:
        assert r["frames"]["ok"] == r["frames"]["total"] > 0, r  # no frame skipped
        assert r["graphs"] and all("c_attn" in g for g in r["graphs"]), r  # every graph: blocks
        assert all(("wte" in g) == (launch != "fsdp") for g in r["graphs"]), r
    saved = torch.load(os.path.join(log_dir, "model_00002.pt"), weights_only=True)["model"]
    assert list(saved) == list(train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=512, n_layer=2,
                                                                  n_head=2, n_embd=32)).state_dict())
