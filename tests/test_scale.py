"""Bigger models: the --model presets, --init_from, activation checkpointing, FSDP2 (the same
losses as DDP, exact resume, checkpoints that move between DDP, FSDP and one process), the
memory estimate against measured peaks, and torchrun across two "nodes" on one machine."""
import gc
import os

import pytest
import torch
from conftest import (KILL_PRELUDE, REPO, SIGTERM_PRELUDE, check_resumed, checkpoint_names,
                      free_port, log_text, make_shards, read_log, run, start, tiny_args)

import train_gpt2


# -----------------------------------------------------------------------------
# presets and --init_from

def test_presets_set_shape_and_gpt3_training_defaults():
    assert train_gpt2.parse_args([]) == train_gpt2.TrainConfig()  # gpt2: exactly the lecture's run
    xl = train_gpt2.parse_args(["--model", "gpt2-xl"])
    assert (xl.n_layer, xl.n_head, xl.n_embd) == (48, 25, 1600)
    # GPT-3 XL (table 2.1): lr 2e-4, batch 1M tokens; warmup 375M tokens, 10B tokens in all
    assert (xl.max_lr, xl.min_lr, xl.total_batch_size) == (2e-4, 2e-5, 2**20)
    assert (xl.warmup_steps, xl.max_steps) == (357, 9536)
    medium = train_gpt2.parse_args(["--model", "gpt2-medium", "--max_lr", "1e-4", "--n_layer", "3"])
    assert (medium.n_layer, medium.n_head, medium.n_embd, medium.max_lr) == (3, 16, 1024, 1e-4)
    assert medium.total_batch_size == 2**19 and medium.min_lr == 3e-5  # explicit flags win
    large = train_gpt2.parse_args(["--init_from", "gpt2-large", "--hellaswag", "0"])
    assert (large.model, large.n_layer, large.n_embd, large.max_lr) == ("gpt2-large", 36, 1280, 2.5e-4)


def test_startup_lines_say_shape_parameters_batch_and_schedule(tmp_path, capsys):
    data = make_shards(tmp_path / "data")
    assert train_gpt2.main(tiny_args(data, str(tmp_path / "log"), model="gpt2-medium", n_head=2,
                                     max_steps=2)) == 0
    out = capsys.readouterr().out
    assert "model gpt2-medium: 2 layers, 2 heads, 32 channels, vocab 512, context 64: 43,904 parameters" in out
    assert "warmup to 0.0003 over 2 steps, cosine to 3e-05 at step 2" in out  # GPT-3 Medium's lr
    assert "total batch 256 tokens" in out and "memory per process (estimate, eager)" in out


def test_init_from_openai_weights_pads_the_vocabulary_with_zero_logits(monkeypatch):
    from conftest import tiny_model
    openai = tiny_model(seed=1, sharpen=0.3, vocab_size=50257, block_size=64)  # as from_pretrained
    monkeypatch.setattr(train_gpt2.GPT, "from_pretrained", classmethod(lambda cls, name: openai))
    monkeypatch.setitem(train_gpt2.PRETRAINED, "gpt2", dict(n_layer=2, n_head=2, n_embd=32))
    model = tiny_model(seed=2, vocab_size=50304, block_size=32)
    train_gpt2.init_weights(model, "gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight[:50257], openai.lm_head.weight)
    assert torch.equal(model.transformer.wpe.weight, openai.transformer.wpe.weight[:32])
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx)[0], openai.eval()(idx)[0]
    assert torch.equal(ours[..., 50257:], torch.zeros_like(ours[..., 50257:]))  # padding: logit 0
    torch.testing.assert_close(ours[..., :50257], theirs, rtol=0, atol=1e-5)
    with pytest.raises(train_gpt2.UserError, match="does not fit"):
        train_gpt2.init_weights(tiny_model(vocab_size=50304, n_layer=3), "gpt2")


def test_init_from_our_checkpoint_is_a_new_run(tmp_path):
    data = make_shards(tmp_path / "data")
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert train_gpt2.main(tiny_args(data, first, max_steps=4)) == 0
    trained = torch.load(os.path.join(first, "model_00004.pt"))
    assert train_gpt2.main(tiny_args(data, second, max_steps=1, val_steps=1,
                                     init_from=os.path.join(first, "model_00004.pt"))) == 0
    rows = read_log(second)
    assert [r[:2] for r in rows] == [(0, "val"), (0, "train")]  # step 0, fresh schedule
    after = torch.load(os.path.join(second, "model_00001.pt"))  # after the new run's one step
    assert after["step"] == 1 and after["optimizer"]["state"][0]["step"].item() == 1  # fresh AdamW
    # its evaluation at step 0 scored the trained weights
    model = train_gpt2.load_model(os.path.join(first, "model_00004.pt"))
    x, y = train_gpt2.DataLoaderLite(2, 32, 0, 1, "val", data).next_batch()
    with torch.no_grad():
        assert rows[0][2] == pytest.approx(model(x, y)[1].item(), abs=1e-4)
    assert not torch.equal(after["model"]["lm_head.weight"], trained["model"]["lm_head.weight"])


# -----------------------------------------------------------------------------
# activation checkpointing and FSDP

def test_activation_checkpointing_gives_identical_losses(tmp_path):
    data = make_shards(tmp_path / "data")
    plain, ckpt = str(tmp_path / "plain"), str(tmp_path / "ckpt")
    assert train_gpt2.main(tiny_args(data, plain, max_steps=5)) == 0
    assert train_gpt2.main(tiny_args(data, ckpt, max_steps=5, activation_checkpointing=1)) == 0
    assert log_text(ckpt) == log_text(plain)


@pytest.fixture(scope="module")
def fsdp_clean(data, tmp_path_factory):
    """An uninterrupted 2-process FSDP run of 12 steps, and the same with DDP."""
    logs = {}
    for name, fsdp in (("fsdp", 1), ("ddp", 0)):
        logs[name] = str(tmp_path_factory.mktemp(name))
        run(tiny_args(data, logs[name], max_steps=12, checkpoint_interval=5, fsdp=fsdp), torchrun=2)
    return logs


@pytest.mark.slow
def test_fsdp_gives_ddps_losses(fsdp_clean):
    fsdp, ddp = read_log(fsdp_clean["fsdp"]), read_log(fsdp_clean["ddp"])
    assert [r[:2] for r in fsdp] == [r[:2] for r in ddp] and len(fsdp) > 12
    for (s, k, a), (_, _, b) in zip(fsdp, ddp):
        assert a == pytest.approx(b, abs=1e-5), (s, k)
    # one checkpoint format: an FSDP checkpoint holds what a DDP one holds
    a = torch.load(os.path.join(fsdp_clean["fsdp"], "model_00005.pt"))
    b = torch.load(os.path.join(fsdp_clean["ddp"], "model_00005.pt"))
    assert list(a["model"]) == list(b["model"]) and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


@pytest.mark.slow
def test_fsdp_sigkill_and_resume_is_exact(data, fsdp_clean, tmp_path):
    log_dir = str(tmp_path / "log")
    p = run(tiny_args(data, log_dir, max_steps=12, checkpoint_interval=5, fsdp=1), torchrun=2,
            prelude=KILL_PRELUDE, env={"KILL_AT": "after_save:model_00005.pt"}, check=False)
    assert p.returncode != 0 and checkpoint_names(log_dir) == ["model_00005.pt"]
    p = run(tiny_args(data, log_dir, max_steps=12, checkpoint_interval=5, fsdp=1, resume="auto", seed=7),
            torchrun=2)
    check_resumed(p.stdout, 5)  # another --seed: a run started over would diverge
    assert log_text(log_dir) == log_text(fsdp_clean["fsdp"])


@pytest.mark.slow
@pytest.mark.parametrize("writer, reader", [("ddp", "fsdp"), ("fsdp", "one process")])
def test_resume_moves_between_ddp_fsdp_and_one_process(data, fsdp_clean, tmp_path, writer, reader):
    log_dir = str(tmp_path / "log")
    os.makedirs(log_dir)
    for name in ("model_00005.pt", "log.txt"):  # the writer's run, as if killed after step 5's save
        with open(os.path.join(fsdp_clean[writer], name), "rb") as f, open(os.path.join(log_dir, name), "wb") as g:
            g.write(f.read())
    flags = dict(max_steps=12, checkpoint_interval=5, resume="auto", seed=7)  # a restart would diverge
    if reader == "fsdp":
        p = run(tiny_args(data, log_dir, fsdp=1, **flags), torchrun=2)
    else:
        p = run(tiny_args(data, log_dir, **flags))
    check_resumed(p.stdout, 5)
    for (s, k, a), (_, _, b) in zip(read_log(log_dir), read_log(fsdp_clean["fsdp"]), strict=True):
        assert a == pytest.approx(b, abs=2e-5), (s, k)


@pytest.mark.slow
def test_fsdp_sigterm_saves_and_exits_0(data, tmp_path):
    log_dir = str(tmp_path / "log")
    p = run(tiny_args(data, log_dir, max_steps=12, checkpoint_interval=100, fsdp=1), torchrun=2,
            prelude=SIGTERM_PRELUDE, env={"SIGTERM_AT": "train_gpt2.get_lr:4:0"})  # step 3's lr, rank 0
    assert "stopped by a signal after step 3" in p.stdout
    assert checkpoint_names(log_dir) == ["model_00004.pt"]
    assert torch.load(os.path.join(log_dir, "model_00004.pt"))["step"] == 4


# -----------------------------------------------------------------------------
# the memory estimate against the measured peak of a training step on CPU

def measured_peak(cfg, dtype):
    """The peak bytes of live CPU tensors during a training step (the second: steady state),
    from torch.profiler's allocation events; model, optimizer and batch are made inside the
    profiled window, so the allocator's running total counts exactly the step's tensors."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    class Loader:
        def next_batch(self):
            g = torch.Generator().manual_seed(0)
            return (torch.randint(cfg.vocab_size, (cfg.micro_batch_size, cfg.sequence_length), generator=g),
                    torch.randint(cfg.vocab_size, (cfg.micro_batch_size, cfg.sequence_length), generator=g))

    gc.collect()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                                                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
        if cfg.activation_checkpointing:
            train_gpt2.checkpoint_blocks(model)
        optimizer = model.configure_optimizers(0.1, 1e-4, "cpu")
        for i in range(2):
            with record_function(f"##step{i}"):
                train_gpt2.train_step(model, optimizer, scaler, Loader(), 1, 1e-4, 1.0, "cpu", dtype)
    allocations, window, stack = [], None, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size,
                                event.extra_fields.total_allocated))
        elif event.name == "##step1":
            window = (event.start_time_ns, event.end_time_ns)
        stack.extend(event.children)
    allocations.sort()
    base = allocations[0][2] - allocations[0][1]  # the running total is process-wide
    return max(total for t, _, total in allocations if window[0] <= t <= window[1]) - base


WIDE_VOCAB = dict(n_layer=4, n_head=2, n_embd=128, vocab_size=4096, micro_batch_size=8)  # the logits dominate
DEEP = dict(n_layer=8, n_head=4, n_embd=256, vocab_size=512, micro_batch_size=16)  # the blocks dominate


# each of the estimate's four activation formulas (float32 or autocast, with or without
# activation checkpointing) once, and each shape with and without checkpointing; bfloat16 on
# the wide shape only (on a CPU, the deep shape's bfloat16 step takes over a minute)
@pytest.mark.parametrize("shape, checkpointing, dtype", [
    (WIDE_VOCAB, 0, torch.bfloat16), (WIDE_VOCAB, 1, torch.bfloat16),
    (DEEP, 0, torch.float32), (DEEP, 1, torch.float32)], ids=["wide-bf16", "wide-ckpt-bf16",
                                                             "deep-fp32", "deep-ckpt-fp32"])
def test_memory_estimate_within_5_percent_of_the_measured_peak(shape, checkpointing, dtype):
    """Tolerance 5% (measured: within 2.1%): the estimate counts the tensors an eager step keeps at its peak,
    leaving out a few small ones (LayerNorm statistics, attention's logsumexp, the batch)."""
    cfg = train_gpt2.TrainConfig(**shape, sequence_length=128, block_size=128, activation_checkpointing=checkpointing,
                                 total_batch_size=shape["micro_batch_size"] * 128)  # one micro-step, as measured
    with torch.device("meta"):
        n_params = sum(p.numel() for p in train_gpt2.GPT(train_gpt2.GPTConfig(
            block_size=128, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.n_embd)).parameters())
    estimate = train_gpt2.estimate_memory(cfg, n_params, dtype, world_size=1)[-1]
    measured = measured_peak(cfg, dtype)
    assert abs(estimate - measured) <= 0.05 * measured, (estimate / 2**20, measured / 2**20)


# -----------------------------------------------------------------------------
# two nodes of one process each, on this machine

def two_nodes(args_per_node):
    port = free_port()
    procs = [start(["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
                    "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test",
                    str(REPO / "train_gpt2.py")] + args, script=None)
             for node, args in enumerate(args_per_node)]
    return [(p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_node_of_two(data, fsdp_clean, tmp_path):
    log_dir = str(tmp_path / "log")
    args = tiny_args(data, log_dir, max_steps=12, checkpoint_interval=5)
    results = two_nodes([args, args])
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert log_text(log_dir) == log_text(fsdp_clean["ddp"])


@pytest.mark.slow
def test_a_node_that_fails_its_start_gives_one_line_on_each(data, tmp_path):
    good = tiny_args(data, str(tmp_path / "log"))
    bad = tiny_args(str(tmp_path / "no_data_here"), str(tmp_path / "log"))
    results = two_nodes([good, bad])
    assert all(rc != 0 for rc, _, _ in results)
    ours = [[line for line in err.splitlines() if line.startswith("error:")] for _, _, err in results]
    assert len(ours[0]) == 1 and "another process of this run failed" in ours[0][0], results[0][2][-3000:]
    assert len(ours[1]) == 1 and "no_data_here does not exist" in ours[1][0], results[1][2][-3000:]
    for _, out, err in results:  # no traceback from our code (torchrun's own report aside)
        assert 'train_gpt2.py", line' not in err, err[-3000:]
