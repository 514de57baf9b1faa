"""
The speed ladder: how fast one training step of GPT-2 gets, one change at a time.

The lecture makes the 124M model's step faster in seven cumulative rungs. This script
times each rung with the model and the training step of train_gpt2.py (imported, not
copied) on random tokens, so it needs no dataset:

    python bench.py                          # the lecture's ladder: 124M, B=16, T=1024
    python bench.py --rungs 1,3,5 --json     # a subset, as a JSON list of rows
    python bench.py --device cpu             # a small model, the whole ladder in ~2 minutes
    python bench.py --device cpu --rungs 1,3,5,6   # the same without torch.compile
    python bench.py --model gpt2-medium --micro_batch_size 8   # GPT-2 350M

    rung  change                 one A100, B=16, T=1024 (the lecture)
    1     fp32                   1000 ms
    2     + TF32 matmuls          333 ms
    3     + bf16 autocast         300 ms
    4     + torch.compile         130 ms
    5     + flash attention        96 ms
    6     + vocab 50257 -> 50304   93 ms
    7     + fused AdamW            90 ms

Each rung adds its change to the rungs chosen before it: leave out 4 and rungs 5-7 run
uncompiled. Rungs 1-4 use the explicit masked softmax, 5 on F.scaled_dot_product_attention.
A change that does not exist on the device (TF32 and fused AdamW off CUDA) gets a row that
says so and no timing. Per row: the median time of one optimizer step, tokens/s, MFU =
tokens/s * train_gpt2.flops_per_token / peak ("-" where the peak is unknown), the
peak GPU memory, the speed-up over the first rung timed, and the loss of the last step (every
rung starts from the same weights, vocab 50304 aside, and trains on the same tokens).
"""
import argparse
import gc
import json
import sys
import time

import torch

import math

from torch.nn import functional as F

from fineweb import OneLineParser, number
from train_gpt2 import (GPT, PRETRAINED, CausalSelfAttention, GPTConfig, UserError, flops_per_token, mfu,
                        peak_tflops, pick_device, pick_dtype, train_step)

# -----------------------------------------------------------------------------
# The rungs: each one turns on one more of the lecture's speed-ups

RUNGS = {
    1: "fp32",
    2: "+ TF32 matmuls",
    3: "+ bf16 autocast",
    4: "+ torch.compile",
    5: "+ flash attention",
    6: "+ vocab 50257 -> 50304",
    7: "+ fused AdamW",
}


def rung_settings(rung, chosen, device_type, half="bfloat16"):
    """What rung `rung` runs with: the changes of every chosen rung up to it that exist here.
    half: rung 3's autocast dtype, float16 (with a gradient scaler) on GPUs without bfloat16."""
    on = {r for r in chosen if r <= rung and not_applicable(r, device_type) is None}
    return dict(tf32=2 in on, dtype=half if 3 in on else "float32", compile=4 in on,
                flash_attention=5 in on, vocab_size=50304 if 6 in on else 50257, fused=7 in on)


def not_applicable(rung, device_type):
    """Why the rung's change does not exist on this device, or None."""
    if rung == 2 and device_type != "cuda":
        return f"n/a on {device_type}"  # TF32 is an Ampere+ tensor-core format
    if rung == 7 and device_type != "cuda":
        return f"n/a on {device_type}"  # train_gpt2 fuses AdamW on CUDA only
    return None


class ExplicitAttention(CausalSelfAttention):
    """Rungs 1-4: the lecture's attention before flash attention, the (T, T) matrix spelled out."""

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


# -----------------------------------------------------------------------------
# Random tokens instead of FineWeb: the speed of a step does not depend on the text

class RandomLoader:
    """next_batch() -> (x, y), both (B, T) int64 on the CPU, y = x shifted by one, as
    DataLoaderLite; tokens uniform over GPT-2's 50257 from a seeded generator."""

    def __init__(self, B, T, seed):
        self.B, self.T = B, T
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        buf = torch.randint(50257, (self.B * self.T + 1,), generator=self.generator)
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)


# -----------------------------------------------------------------------------
# Timing one rung

def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def free_memory(device):
    """Start a rung clean: the last rung's model collected, its compiled graphs forgotten."""
    gc.collect()
    torch._dynamo.reset()  # also resets dynamo's per-function recompilation limits
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_rung(args, settings):
    """Build the model, warm up (compilation happens here), time args.steps optimizer steps.
    Returns the model's training FLOPs per token, the median seconds per step, peak GiB
    (CUDA) and the loss."""
    free_memory(args.device)
    torch.set_float32_matmul_precision("high" if settings["tf32"] else "highest")
    torch.manual_seed(args.seed)  # every rung: the same initial weights, the same tokens
    config = GPTConfig(vocab_size=settings["vocab_size"], n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(args.device)
    if not settings["flash_attention"]:
        for block in model.transformer.h:
            block.attn.__class__ = ExplicitAttention  # the same weights, the explicit forward
    # configure_optimizers fuses AdamW for device_type "cuda": "cpu" asks for the plain loop
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4,
                                           device_type="cuda" if settings["fused"] else "cpu")
    dtype = getattr(torch, settings["dtype"])
    # bf16 and fp32 need no loss scaling; float16 (GPUs without bf16) does, as in training
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=dtype == torch.float16)
    if settings["compile"]:
        model = torch.compile(model, dynamic=False)  # as train_gpt2.py compiles it
    loader = RandomLoader(args.micro_batch_size, args.sequence_length, args.seed)

    def step():  # train_gpt2's optimizer step: forward, backward, clip, AdamW
        loss, _ = train_step(model, optimizer, scaler, loader, args.grad_accum_steps, 6e-4, 1.0,
                             args.device, dtype)
        loss = loss.item()  # waits for the loss ...
        sync(args.device)  # ... and for the optimizer's kernels queued after it
        return loss

    for _ in range(args.warmup_steps):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]  # the median: robust to a busy neighbour
    memory = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    flops = flops_per_token(model, args.sequence_length)
    del model, optimizer  # free weights, gradients and AdamW moments before the next rung
    free_memory(args.device)
    return flops, seconds, memory, loss


def ladder(args):
    """One row dict per chosen rung, in order, each yielded as soon as it is measured."""
    device_type = args.device.split(":")[0]
    tokens = args.micro_batch_size * args.sequence_length * args.grad_accum_steps
    first = None  # seconds per step of the first rung timed: speed-ups are relative to it
    # rung 3 on CUDA: training's dtype (float16 + scaler where the GPU has no bf16); else bf16
    half = str(pick_dtype("auto", args.device)[0])[6:] if device_type == "cuda" else "bfloat16"
    for rung in args.rungs:
        settings = rung_settings(rung, args.rungs, device_type, half)
        row = dict(rung=rung, change=RUNGS[rung], ms=None, tokens_per_sec=None, mfu=None,
                   memory_gib=None, speedup=None, loss=None,
                   note=not_applicable(rung, device_type) or "", **settings)
        if row["note"]:
            yield row  # say so, rather than time the rung before it a second time
            continue
        if rung == 3 and device_type != "cuda":
            row["note"] = f"{device_type} autocast"  # runs, but not on the lecture's tensor cores
        elif rung == 3 and half == "float16":
            row["note"] = "float16 + scaler: no bf16 on this GPU"
        try:
            flops, seconds, memory, loss = run_rung(args, settings)
        except torch.cuda.OutOfMemoryError:  # e.g. fp32 with the (T, T) attention matrices
            row["note"] = "out of memory (try a smaller --micro_batch_size)"
            yield row
            continue
        first = first or seconds
        row.update(ms=1000 * seconds, tokens_per_sec=tokens / seconds, memory_gib=memory,
                   speedup=first / seconds, loss=loss)
        peak = args.peak_tflops or peak_tflops(args.device, getattr(torch, settings["dtype"]))
        if peak:
            row["mfu"] = mfu(tokens / seconds, flops, peak)
        yield row


COLUMNS = [("rung", "<5", "d"), ("change", "<24", "s"), ("ms/step", ">10", ".1f"),
           ("tokens/s", ">12", ",.0f"), ("MFU %", ">7", ".1f"), ("mem GiB", ">9", ".2f"),
           ("speed-up", ">9", ".2f"), ("loss", ">9", ".4f"), ("", "", "")]


def format_row(values):
    """One line of the table; "-" for what was not measured or is not known."""
    return "".join(f"{'-' if v is None else format(v, kind):{align}}"
                   for v, (_, align, kind) in zip(values, COLUMNS)).rstrip()


def table_row(r):
    percent = None if r["mfu"] is None else 100 * r["mfu"]
    return format_row([r["rung"], r["change"], r["ms"], r["tokens_per_sec"], percent,
                       r["memory_gib"], r["speedup"], r["loss"], "  " + r["note"]])


# -----------------------------------------------------------------------------
# Command line

def parse_rungs(text):
    try:
        rungs = sorted({int(r) for r in text.split(",")})
    except ValueError:
        rungs = None
    if not rungs or not all(r in RUNGS for r in rungs):
        raise argparse.ArgumentTypeError(f"expected rung numbers 1-7 separated by commas, "
                                         f"got {text!r}")
    return rungs


# the lecture's ladder on a GPU; elsewhere a small model (whose lm_head still dominates)
DEFAULTS = dict(  # flag: (on CUDA, elsewhere, what it is)
    micro_batch_size=(16, 4, "B, sequences per micro-batch"),
    sequence_length=(1024, 128, "T, tokens per sequence"),
    n_layer=(12, 2, "transformer blocks"),
    n_head=(12, 4, "attention heads"),
    n_embd=(768, 128, "channels"),
    steps=(20, 10, "timed optimizer steps per rung"),
    warmup_steps=(5, 2, "untimed steps before them (compilation happens here)"),
)


def parse_args(argv=None):
    parser = OneLineParser(description="Time the lecture's speed ladder on random tokens.")
    parser.add_argument("--device", default="auto", help="cuda, mps or cpu (default: auto)")
    parser.add_argument("--model", choices=list(PRETRAINED),
                        help="one of GPT-2's shapes; sets --n_layer, --n_head and --n_embd "
                             "(default: none: 124M on CUDA, a small model elsewhere)")
    for name, (gpu, other, what) in DEFAULTS.items():
        low = 0 if name == "warmup_steps" else 1
        parser.add_argument(f"--{name}", type=number(int, low), help=f"{what} (default: {gpu} on "
                            f"CUDA, {other} elsewhere)")
    parser.add_argument("--grad_accum_steps", type=number(int, 1), default=1,
                        help="micro-batches per optimizer step (default: 1, as the lecture)")
    parser.add_argument("--rungs", type=parse_rungs, default=list(RUNGS),
                        help="which rungs, e.g. 1,3,5 (default: all)")
    parser.add_argument("--peak_tflops", type=number(float, 1e-9),
                        help="accelerator peak TFLOPS for MFU (default: the GPU's, per dtype, "
                             "from train_gpt2.PEAK_TFLOPS)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows (default: a table)")
    parser.add_argument("--seed", type=number(int, 0), default=1337, help="(default: 1337)")
    args = parser.parse_args(argv)

    args.device = pick_device(args.device)
    cuda = args.device.startswith("cuda")
    for name, (gpu, other, _) in DEFAULTS.items():
        if getattr(args, name) is None:  # a flag given wins over --model's shape, which wins here
            setattr(args, name, PRETRAINED.get(args.model, {}).get(name, gpu if cuda else other))
    if args.sequence_length > GPTConfig.block_size:
        raise UserError(f"--sequence_length {args.sequence_length} is longer than "
                        f"block_size {GPTConfig.block_size}")
    if args.n_embd % args.n_head != 0:
        raise UserError(f"--n_embd {args.n_embd} is not a multiple of --n_head {args.n_head}")
    return args


def main(argv=None):
    precision = torch.get_float32_matmul_precision()
    try:
        args = parse_args(argv)
        if not args.json:
            cuda = args.device.startswith("cuda")
            name = torch.cuda.get_device_name(args.device) if cuda else args.device
            peak = (f"peak {args.peak_tflops:g} TFLOPS" if args.peak_tflops else
                    "peak per dtype from PEAK_TFLOPS" if cuda else "peak unknown")
            print(f"{name}, torch {torch.__version__}, {peak}; n_layer {args.n_layer}, "
                  f"n_head {args.n_head}, n_embd {args.n_embd}; B={args.micro_batch_size}, "
                  f"T={args.sequence_length}, {args.grad_accum_steps} micro-batch(es) per step; "
                  f"median of {args.steps} steps after {args.warmup_steps} warmup")
            print("".join(f"{title:{align}}" for title, align, _ in COLUMNS).rstrip())
        rows = []
        for row in ladder(args):
            rows.append(row)
            if not args.json:
                print(table_row(row), flush=True)
        if args.json:
            print(json.dumps(rows, indent=1))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_float32_matmul_precision(precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
