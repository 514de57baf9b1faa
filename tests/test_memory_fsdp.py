"""The memory estimate with gradient accumulation, against the peak measured on 2 gloo
processes: under FSDP with the gradient sync off between micro-steps, every rank holds the
whole, unsharded gradient (the estimate divided it by the number of processes)."""
import json

import pytest
from conftest import run

import train_gpt2

# the peak bytes of live CPU tensors during the second training step of each rank, from
# torch.profiler's allocation events (model, optimizer and batch made inside the profiled
# window), and train_gpt2's estimate for the same run; one JSON line per rank
MEASURE = """
import gc, json, sys
import torch
import torch.distributed as dist
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function
sys.path.insert(0, sys.argv[2])
import train_gpt2

cfg = train_gpt2.TrainConfig(**json.loads(sys.argv[1]))
dist.init_process_group("gloo")
world = dist.get_world_size()
accum = cfg.total_batch_size // (cfg.micro_batch_size * cfg.sequence_length * world)


class Loader:
    def next_batch(self):
        g = torch.Generator().manual_seed(dist.get_rank())
        shape = (cfg.micro_batch_size, cfg.sequence_length)
        return torch.randint(cfg.vocab_size, shape, generator=g), torch.randint(cfg.vocab_size, shape, generator=g)


gc.collect()
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                                                n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.fsdp:
        train_gpt2.shard_model(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not cfg.fsdp else model
    optimizer = model.configure_optimizers(0.1, 1e-4, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for i in range(2):
        with record_function(f"##step{i}"):
            train_gpt2.train_step(wrapped, optimizer, scaler, Loader(), accum, 1e-4, 1.0, "cpu", torch.float32)
allocations, window, stack = [], None, list(prof.profiler.kineto_results.experimental_event_tree())
while stack:
    event = stack.pop()
    if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
        allocations.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated))
    elif event.name == "##step1":
        window = (event.start_time_ns, event.end_time_ns)
    stack.extend(event.children)
allocations.sort()
base = allocations[0][2] - allocations[0][1]  # the running total is process-wide
peak = max(total for t, _, total in allocations if window[0] <= t <= window[1]) - base
estimate = train_gpt2.estimate_memory(cfg, n_params, torch.float32, world)
print("PEAK " + json.dumps(dict(accum=accum, measured=peak, estimate=estimate[-1], grads=estimate[1])), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
# FSDP2 on gloo gathers a few blocks ahead, and its peak varies from run to run: measured 4-12%
# above the estimate (the estimate that ignored the held gradients: 22-25%)
@pytest.mark.parametrize("fsdp, processes, tolerance", [(1, 2, 0.15), (0, 1, 0.05)])
def test_memory_estimate_with_gradient_accumulation(tmp_path, fsdp, processes, tolerance):
    """16 layers (so that the gradient is large against the rest), accumulation 2. Measured
    (2-core CPU VM, torch 2.13.0+cpu, 2026-12-03): FSDP 4-8% over the estimate, which
    before counted 1/2 of the gradient and was 22-25% under; on gloo a rank's peak also
    holds a few more gathered blocks, varying from run to run: hence 12%. 1 process: 1%."""
    shape = dict(n_layer=16, n_head=4, n_embd=128, vocab_size=512, micro_batch_size=4, sequence_length=64,
                 block_size=64, total_batch_size=4 * 64 * processes * 2, fsdp=fsdp)
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    p = run([str(script), json.dumps(shape), str(train_gpt2.__file__).rsplit("/", 1)[0]], torchrun=processes,
            script=None)
    rows = [json.loads(line[len("PEAK "):]) for line in p.stdout.splitlines() if line.startswith("PEAK ")]
    assert len(rows) == processes, p.stdout[-3000:]
    n_params = 16 * (12 * 128 * 128 + 13 * 128) + 512 * 128 + 64 * 128 + 2 * 128
    for r in rows:
        assert r["accum"] == 2 and r["grads"] == 4 * n_params  # whole, on every rank
        assert abs(r["estimate"] - r["measured"]) <= tolerance * r["measured"], r
