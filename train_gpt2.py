"""
Reproduce GPT-2 (124M) on 10B tokens of FineWeb-Edu, in one readable file.

This follows the "Let's reproduce GPT-2 (124M)" lecture: the model, the data loader,
the learning-rate schedule, the distributed helpers, the config and the training loop,
top to bottom. The defaults are the lecture's run, number for number (see SPEC.md).

    python fineweb.py                                           # tokenize the data (once)
    python train_gpt2.py                                        # one GPU (or MPS, or CPU)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --resume auto   # after a preemption

A CPU smoke run on a tiny model (see README.md for the data step):

    python train_gpt2.py --device cpu --n_layer 2 --n_head 2 --n_embd 64 \
        --micro_batch_size 4 --sequence_length 64 --total_batch_size 512 \
        --max_steps 50 --warmup_steps 10 --eval_interval 25 --val_steps 2 --hellaswag_limit 20
"""
import argparse
import dataclasses
import gc
import glob
import inspect
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

import fineweb  # only for where it writes the shards (it imports nothing heavy)


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 1, no traceback."""


# -----------------------------------------------------------------------------
# The model: GPT-2, with the module names of Hugging Face's GPT2LMHeadModel

@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length, tokens (GPT-2's n_ctx)
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_layer: int = 12  # transformer blocks (GPT-2 124M)
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # embedding width C; head size = n_embd // n_head = 64
    flash_attention: bool = True  # False: explicit masked softmax (the lecture's slow path)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True  # scaled init, see GPT._init_weights
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.flash_attention = config.flash_attention

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()  # batch, time (sequence length), channels (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs): every head attends independently
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        is_causal = True
        if kv_cache is not None:  # generation (sample.py): reuse keys/values of earlier tokens
            if "k" in kv_cache:
                assert T == 1, "with a filled KV cache, feed one token at a time"
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
                is_causal = False  # the one new query may look at every cached position
            kv_cache["k"], kv_cache["v"] = k, v
        if self.flash_attention:
            # fused kernel (flash attention on GPU): the (T, T) matrix never reaches memory
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        else:
            # the same maths spelled out: (B, nh, T, hs) x (B, nh, hs, Tk) -> (B, nh, T, Tk)
            Tk = k.size(2)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = att @ v  # (B, nh, T, Tk) x (B, nh, Tk, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream x only ever gets added to."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)  # tokens communicate
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


# Hugging Face stores these four weights as Conv1D, i.e. (in, out): transpose them.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# ... and may keep the causal mask as buffers, which are not weights (we use is_causal).
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
# The four released GPT-2 sizes (all: vocab 50257, block_size 1024).
PRETRAINED = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # Creation order matters: every constructor draws from the RNG, so with
        # torch.manual_seed(1337) this order gives the lecture's initial weights.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings (V, C)
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),  # final LayerNorm (GPT-2 added it)
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (as in GPT-2 and "Attention is all you need"): one (V, C) matrix
        # embeds tokens and scores them; it saves 38M parameters
        self.transformer.wte.weight = self.lm_head.weight
        # apply() visits modules in order, so the tied matrix ends with lm_head's draw
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02  # GPT-2's init, about 1/sqrt(768)
            if getattr(module, "RESIDUAL_PROJECTION", False):
                # each block adds twice to the residual stream: scale by 1/sqrt(2 * n_layer)
                # so its variance does not grow with depth (GPT-2 paper, section 2.3)
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_cache=None):
        # idx: (B, T) token ids; targets: (B, T) next-token ids, or None
        B, T = idx.size()
        past = kv_cache[0]["k"].size(2) if kv_cache and "k" in kv_cache[0] else 0
        assert past + T <= self.config.block_size, (
            f"sequence of {past + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache[i] if kv_cache is not None else None)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:  # mean cross-entropy over all B*T positions
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @classmethod
    def from_pretrained(cls, model_type):
        """OpenAI's weights through Hugging Face: 'gpt2' ... 'gpt2-xl', or a local folder
        written by transformers' save_pretrained."""
        from transformers import GPT2LMHeadModel  # imported here: only this path needs it
        hf_model = GPT2LMHeadModel.from_pretrained(model_type)
        c = hf_model.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                           n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
        if model_type in PRETRAINED:
            assert dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd) == PRETRAINED[model_type]
        model = GPT(config)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf_model.state_dict().items() if not k.endswith(HF_BUFFERS)}
        assert set(sd_hf) == set(sd), f"key mismatch: {sorted(set(sd_hf) ^ set(sd))}"
        with torch.no_grad():
            for k, v in sd_hf.items():
                if k.endswith(HF_TRANSPOSED):
                    v = v.t()
                assert v.shape == sd[k].shape, f"{k}: {tuple(v.shape)} vs {tuple(sd[k].shape)}"
                sd[k].copy_(v)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, fused=None):
        """AdamW as GPT-3: betas (0.9, 0.95), eps 1e-8, decay on every matrix (matmul
        weights and embeddings) and none on biases and LayerNorm parameters."""
        params = [p for p in self.parameters() if p.requires_grad]  # the tied matrix once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if fused is None:  # one kernel for the whole update instead of a loop over tensors
            fused = params[0].device.type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def num_parameters(config):
    """Parameter count from the shapes (the tied wte/lm_head matrix counted once)."""
    C, L = config.n_embd, config.n_layer
    per_block = 12 * C * C + 13 * C  # c_attn 3C^2+3C, c_proj C^2+C, c_fc 4C^2+4C, c_proj 4C^2+C, 2 LNs
    return config.vocab_size * C + config.block_size * C + L * per_block + 2 * C


def flops_per_token(config, T):
    """Training FLOPs per token: 6N for the matmuls with the weights (forward 2N, backward 4N)
    plus attention's 12 * n_layer * n_head * head_size * T (PaLM paper, appendix B)."""
    return 6 * num_parameters(config) + 12 * config.n_layer * config.n_embd * T


def mfu(tokens_per_sec, config, T, peak_tflops):
    """Model FLOPs utilization, a fraction: the FLOPs the model needs / what the chip peaks at."""
    return tokens_per_sec * flops_per_token(config, T) / (peak_tflops * 1e12)


# -----------------------------------------------------------------------------
# Data: token shards written by fineweb.py, read a batch at a time

def load_shard(path):
    """Memory-map one shard: only the tokens of each batch are ever read from disk."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .npy shard ({e})") from None
    if tokens.ndim != 1 or tokens.dtype != np.uint16:
        raise UserError(f"{path} is not a 1-D uint16 token shard "
                        f"(got {tokens.dtype}, shape {tokens.shape}): rewrite it with fineweb.py")
    return tokens


class DataLoaderLite:
    """Contiguous (B, T) batches from the shards of one split, in order.

    One process reads the stream of micro-batches the lecture's loader reads: offsets
    0, B*T, 2*B*T, ... into a shard, to the next shard (wrapping around) when the next read
    of B*T+1 tokens would pass its end. With N processes, rank r takes micro-batches r,
    r+N, r+2N, ... of that same stream, so N ranks together see exactly the tokens that
    one process with N times the gradient accumulation sees, and cross to the next shard
    together (the reference let ranks > 0 leave each shard early and drop batches).
    shuffle=True visits the shards, and the batches within a shard, in a fresh random
    order each epoch (seeded, the same on every rank); the default is the reference's order.
    """

    def __init__(self, B, T, process_rank, num_processes, split, data_root=fineweb.LOCAL_DIR,
                 shuffle=False, seed=0):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shuffle, self.seed = shuffle, seed
        if not os.path.isdir(data_root):
            raise UserError(f"data folder {data_root} does not exist: run `python fineweb.py` first")
        paths = sorted(glob.glob(os.path.join(data_root, f"*{split}*.npy")))
        if not paths:
            raise UserError(f"no {split} shards (*{split}*.npy) in {data_root}: "
                            "run `python fineweb.py` first")
        self.paths = paths
        self.shards = [load_shard(p) for p in paths]
        # batch k of a shard starts at k*B*T and needs B*T+1 tokens (targets are shifted by one)
        self.batches_per_shard = [max(0, (len(s) - 1) // (B * T)) for s in self.shards]
        if sum(self.batches_per_shard) == 0:
            raise UserError(f"the {split} shards in {data_root} hold fewer than "
                            f"B*T+1 = {B * T + 1} tokens each: use smaller batches or more data")
        self.reset()

    def reset(self):
        self.set_state(dict(epoch=0, shard=0, batch=0))

    # the position in the stream, the same on every rank: (epoch, shard, batch in shard)
    def state_dict(self):
        return dict(epoch=self.epoch, shard=self.shard, batch=self.batch)

    def set_state(self, state):
        self.epoch, self.shard, self.batch = state["epoch"], state["shard"], state["batch"]
        self._plan_epoch()
        self._skip_used_up()  # e.g. shard 0 too small for one batch

    def _plan_epoch(self):
        n = len(self.shards)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            self.shard_order = rng.permutation(n).tolist()
        else:
            self.shard_order = list(range(n))
        self._plan_shard()

    def _plan_shard(self):
        shard_index = self.shard_order[self.shard]
        nb = self.batches_per_shard[shard_index]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, shard_index])
            self.batch_order = rng.permutation(nb).tolist()
        else:
            self.batch_order = range(nb)

    def _advance(self):
        """Move the stream on by one micro-batch."""
        self.batch += 1
        self._skip_used_up()

    def _skip_used_up(self):
        """Go to the next shard (wrapping around) while this one has no batch left."""
        while self.batch >= len(self.batch_order):
            self.batch = 0
            self.shard += 1
            if self.shard == len(self.shards):
                self.shard, self.epoch = 0, self.epoch + 1
                self._plan_epoch()
            else:
                self._plan_shard()

    def next_batch(self):
        """This rank's next (x, y) pair, each (B, T) int64; y is x shifted left by one."""
        B, T = self.B, self.T
        for r in range(self.num_processes):
            if r == self.process_rank:
                shard = self.shards[self.shard_order[self.shard]]
                start = self.batch_order[self.batch] * B * T
                buf = torch.from_numpy(shard[start:start + B * T + 1].astype(np.int64))
            self._advance()
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets
        return x, y


# -----------------------------------------------------------------------------
# Learning-rate schedule: linear warmup, then cosine decay to 10% (GPT-3 paper, B.1)

def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:  # 1) linear warmup, never exactly 0
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:  # 3) past the end: the minimum
        return min_lr
    # 2) in between, cosine from max_lr down to min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# Distributed helpers: torchrun's environment decides; one process needs no torchrun

@dataclass
class Dist:
    rank: int = 0  # global rank (torchrun's RANK)
    local_rank: int = 0  # rank on this node (LOCAL_RANK): picks the GPU
    world_size: int = 1  # processes in all (WORLD_SIZE)
    device: str = "cpu"

    @property
    def ddp(self):
        return self.world_size > 1 or dist.is_initialized()

    @property
    def master_process(self):
        return self.rank == 0  # only rank 0 prints, logs and writes files

    @property
    def device_type(self):
        return self.device.split(":")[0]  # "cuda", "mps" or "cpu"


def auto_device():
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup_distributed(device="auto"):
    """Start the process group when launched by torchrun: NCCL on GPUs, gloo on CPU."""
    device = auto_device() if device == "auto" else device
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"multi-process runs need --device cuda or cpu, not {device}")
    dist.init_process_group(backend=backend)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def all_reduce_sum(tensor, d):
    """Sum over ranks, in place (SUM exists on every backend; gloo has no AVG)."""
    if d.ddp:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup_distributed(d):
    if d.ddp and dist.is_initialized():
        # DDP sits in a reference cycle: free it now, while the process group is alive (left
        # to the interpreter's exit, gloo sometimes aborts with "terminate called ...")
        gc.collect()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# One optimizer step, evaluation and sampling (bench.py and sample.py import these)

def to_device(t, device):
    if device.startswith("cuda"):  # pinned memory: the copy overlaps with GPU work
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def autocast_context(device_type, dtype):
    """bf16 autocast (matmuls in bfloat16, reductions in float32); no scaler needed."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def train_step(model, optimizer, loader, grad_accum_steps, lr, grad_clip, device, dtype):
    """Accumulate the gradient of one total batch, clip it, take one AdamW step.
    Returns this rank's mean loss and the gradient norm before clipping, as tensors
    (no .item(): the caller decides when to wait for the GPU)."""
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = to_device(x, device), to_device(y, device)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # all-reduce the gradients only once, on the last micro-step
            model.require_backward_grad_sync = (micro_step == grad_accum_steps - 1)
        with autocast_context(device.split(":")[0], dtype):
            logits, loss = model(x, y)
        # the loss is a mean over B*T tokens; dividing by the number of micro-steps makes
        # the summed gradient the gradient of the mean over the whole total batch
        loss = loss / grad_accum_steps
        loss_accum += loss.detach()
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    optimizer.step()
    return loss_accum, norm


@torch.no_grad()
def evaluate_loss(model, loader, val_steps, d, dtype):
    """Mean loss over the first val_steps micro-batches of the split, whatever the number
    of ranks: rank r takes micro-batches r, r+N, ... (the reference took val_steps per rank)."""
    loader.reset()
    loss_accum = torch.zeros((), device=d.device)
    for i in range(math.ceil(val_steps / d.world_size)):
        x, y = loader.next_batch()
        if i * d.world_size + d.rank >= val_steps:
            break  # the last round has fewer micro-batches than ranks
        with autocast_context(d.device_type, dtype):
            logits, loss = model(to_device(x, d.device), to_device(y, d.device))
        loss_accum += loss.detach() / val_steps
    return all_reduce_sum(loss_accum, d).item()


@torch.no_grad()
def generate(model, idx, max_length, top_k=50, temperature=1.0, generator=None,
             use_kv_cache=False, dtype=torch.float32, vocab_limit=None):
    """Extend idx (B, T0) to (B, max_length) tokens: softmax, keep the top_k, sample.
    vocab_limit: sample only ids below it (the tokenizer's 50257 when the model's vocabulary
    is padded to 50304: the padding ids have no text and would crash decode).

    Without a KV cache every step runs the whole fixed-size (B, max_length) buffer (the
    padding on the right cannot change causal logits), so a compiled model sees one shape
    and compiles once. With one (sample.py) each step feeds only the newest token."""
    B, T0 = idx.shape
    device_type = idx.device.type
    buf = torch.zeros(B, max_length, dtype=torch.long, device=idx.device)
    buf[:, :T0] = idx
    kv_cache = [dict() for _ in range(model.config.n_layer)] if use_kv_cache else None
    for t in range(T0, max_length):
        with autocast_context(device_type, dtype):
            if kv_cache is None:
                logits = model(buf)[0][:, t - 1, :]  # (B, V): the prediction for position t
            else:  # first the whole prompt, then one token at a time
                new = buf[:, :t] if t == T0 else buf[:, t - 1:t]
                logits = model(new, kv_cache=kv_cache)[0][:, -1, :]
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]  # (B, vocab_limit): ids keep their meaning
        probs = F.softmax(logits.float() / temperature, dim=-1)
        # top-k sampling (Hugging Face's default of 50): never pick a very unlikely token
        topk_probs, topk_indices = torch.topk(probs, top_k, dim=-1)  # (B, top_k)
        ix = torch.multinomial(topk_probs, 1, generator=generator)  # (B, 1)
        buf[:, t] = torch.gather(topk_indices, -1, ix).squeeze(-1)
    return buf


# bf16 dense tensor-core peak, TFLOPS, for MFU (vendor datasheets); --peak_tflops overrides
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989),
               ("B200", 2250), ("A100", 312), ("A10G", 125), ("L40S", 362), ("L4", 121),
               ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 125)]


def peak_tflops(device_name):
    for name, tflops in PEAK_TFLOPS:  # first match wins, so "H100 PCIe" before "H100"
        if name in device_name:
            return tflops
    return None


# -----------------------------------------------------------------------------
# Checkpoints: plain types only, written atomically, enough to resume exactly

CHECKPOINT_KEYS = ("model", "config", "step", "val_loss")


def save_checkpoint(path, checkpoint):
    """Write to a temporary name, flush to disk, then rename: a crash mid-write leaves
    the previous checkpoint untouched and no half-written file under the real name."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load with its safe default (weights_only): our checkpoints hold plain types."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint of train_gpt2.py "
                        f"(expected a dict with keys {', '.join(CHECKPOINT_KEYS)})")
    return checkpoint


def list_checkpoints(log_dir):
    """(step, path) of the complete checkpoints in log_dir, oldest first (.tmp files are
    unfinished writes)."""
    found = [(re.fullmatch(r"model_(\d+)\.pt", os.path.basename(p)), p)
             for p in glob.glob(os.path.join(log_dir, "model_*.pt"))]
    return sorted((int(m.group(1)), p) for m, p in found if m)


def model_from_checkpoint(path, device="cpu"):
    """The GPT of one of our checkpoints, in eval mode (for hellaswag.py, sample.py, ...)."""
    checkpoint = load_checkpoint(path)
    model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def load_model(checkpoint=None, model_type=None, device="cpu"):
    """One of our checkpoints, or OpenAI's weights ('gpt2', ...) through Hugging Face."""
    if checkpoint is not None:
        return model_from_checkpoint(checkpoint, device)
    try:
        model = GPT.from_pretrained(model_type)
    except OSError as e:  # offline, and the weights are not in Hugging Face's cache
        raise UserError(f"cannot load {model_type} from Hugging Face: "
                        f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def rng_state():
    """RNG states of this process. Training draws no random numbers after the init (no
    dropout), but a resumed run should not depend on that staying true."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU only: resumable on fewer GPUs
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# Config: one dataclass, every field a --flag; the defaults are the lecture's run

@dataclass
class TrainConfig:
    # files
    data_root: str = fineweb.LOCAL_DIR  # token shards from fineweb.py (next to the scripts)
    log_dir: str = "log"  # log.txt and checkpoints model_{step:05d}.pt
    # model: GPT-2 124M, vocab padded 50257 -> 50304 = 393 * 128 (faster kernels)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # channels
    block_size: int = 1024  # max context, tokens
    vocab_size: int = 50304  # padded; the 47 extra tokens are never seen, their logits learn -inf
    # batch: 2**19 tokens per optimizer step, about GPT-3 small's 0.5M (GPT-3 paper, table 2.1)
    micro_batch_size: int = 64  # B, sequences per forward/backward per process
    sequence_length: int = 1024  # T, tokens per sequence
    total_batch_size: int = 524288  # tokens per optimizer step, all processes together
    # optimizer and schedule (GPT-3 paper, appendix B)
    max_steps: int = 19073  # 10e9 tokens / 2**19 tokens per step = one epoch of FineWeb-Edu 10B
    warmup_steps: int = 715  # 375M tokens of warmup (GPT-3) / 2**19
    max_lr: float = 6e-4  # GPT-3 small's learning rate
    min_lr: float = 6e-5  # 10% of max_lr at the end of the cosine
    weight_decay: float = 0.1  # on matmul weights and embeddings only
    grad_clip: float = 1.0  # max global gradient norm
    shuffle: bool = False  # shuffle shards and batches each epoch (the reference reads in order)
    # evaluation, sampling, checkpoints
    eval_interval: int = 250  # steps between val loss / HellaSwag / samples (and at the last step)
    val_steps: int = 20  # val micro-batches in total (split across ranks)
    hellaswag: bool = True  # HellaSwag accuracy (acc_norm) at every evaluation
    hellaswag_limit: int = 0  # only the first N val examples (0: all 10,042)
    sample: bool = True  # print 4 samples at every evaluation (not at step 0)
    checkpoint_interval: int = 5000  # steps between checkpoints (and at the last step)
    keep_checkpoints: int = 0  # keep only the newest N checkpoints (0: keep all)
    resume: str = ""  # "auto": newest checkpoint in log_dir, or a path; "": start fresh
    # system
    device: str = "auto"  # cuda, then mps, then cpu
    dtype: str = "auto"  # autocast dtype: bfloat16 on CUDA, float32 elsewhere
    compile: bool = None  # torch.compile the model (default: on CUDA only)
    seed: int = 1337  # the lecture's seed
    peak_tflops: float = 0.0  # accelerator peak for MFU (0: look the GPU up in PEAK_TFLOPS)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def str2bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0/true/false, got {s!r}")


def parse_args(argv=None):
    parser = OneLineParser(description="Train GPT-2 (124M) on FineWeb-Edu; defaults = the lecture's run.")
    # --help shows each field's comment from the dataclass above
    comments = dict(re.findall(r"^ +(\w+): \w+ = .*?# (.*)$", inspect.getsource(TrainConfig), re.M))
    for field in dataclasses.fields(TrainConfig):
        kind = {"bool": str2bool, "int": int, "float": float, "str": str}[field.type if isinstance(
            field.type, str) else field.type.__name__]
        default = "auto" if field.default is None else field.default
        parser.add_argument(f"--{field.name}", type=kind, default=field.default,
                            metavar=field.name.upper() if kind is not str2bool else "0|1",
                            help=f"{comments.get(field.name, '')} (default: {default})".replace("%", "%%"))
    return TrainConfig(**vars(parser.parse_args(argv)))


# -----------------------------------------------------------------------------
# The training loop

def gpt2_tokenizer():
    import tiktoken  # imported here: importing this file builds no tokenizer
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}): tiktoken downloads "
                        "it once into its cache; offline, set TIKTOKEN_CACHE_DIR to a folder that "
                        "holds it, or pass --sample 0 --hellaswag 0") from None


def find_checkpoint(cfg, log):
    """(path, checkpoint) to resume from, or (None, None) for a fresh start."""
    if not cfg.resume:
        return None, None
    if cfg.resume != "auto":
        return cfg.resume, load_checkpoint(cfg.resume)
    for _, path in reversed(list_checkpoints(cfg.log_dir)):  # newest first
        try:
            return path, load_checkpoint(path)
        except UserError as e:  # e.g. a file cut short by a full disk
            log(f"warning: {e}; trying the previous checkpoint")
    log(f"--resume auto: no checkpoint in {cfg.log_dir}, starting fresh")
    return None, None


def check_resumable(path, checkpoint, model_config, cfg):
    if "optimizer" not in checkpoint or "loader" not in checkpoint:
        raise UserError(f"{path} holds weights only (no optimizer or loader state): cannot resume")
    wrong = [f"{k} {checkpoint['config'].get(k)} (flags: {v})"
             for k, v in dataclasses.asdict(model_config).items()
             if k != "flash_attention" and checkpoint["config"].get(k) != v]
    if wrong:
        raise UserError(f"{path} is a different model: {', '.join(wrong)}")
    old = checkpoint["train_config"]
    if (old["micro_batch_size"], old["sequence_length"]) != (cfg.micro_batch_size, cfg.sequence_length):
        raise UserError(f"{path} was written with --micro_batch_size {old['micro_batch_size']} "
                        f"--sequence_length {old['sequence_length']}: resume needs the same "
                        "(the loader position counts batches of B*T tokens)")


def trim_log(log_file, step):
    """Keep what was logged before `step`: the resumed run logs step and later again
    (a killed run may have logged past its last checkpoint, or half a line)."""
    if not os.path.exists(log_file):
        return
    with open(log_file) as f:
        lines = f.readlines()
    def keep(line):
        first = line.split(" ", 1)[0]
        return line.endswith("\n") and (not first.isdigit() or int(first) < step)
    with open(log_file, "w") as f:
        f.writelines(line for line in lines if keep(line))


class StopRequest:
    """SIGTERM (schedulers, preemption) or Ctrl-C: finish the step, checkpoint, exit 0."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

    def __call__(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(cfg, d):
    log = print if d.master_process else (lambda *args, **kwargs: None)
    B, T = cfg.micro_batch_size, cfg.sequence_length
    if T > cfg.block_size:
        raise UserError(f"--sequence_length {T} is longer than --block_size {cfg.block_size}")
    if cfg.total_batch_size % (B * T * d.world_size) != 0:
        raise UserError(f"--total_batch_size {cfg.total_batch_size} is not divisible by "
                        f"B*T*world_size = {B}*{T}*{d.world_size} = {B * T * d.world_size}")
    if cfg.n_embd % cfg.n_head != 0:
        raise UserError(f"--n_embd {cfg.n_embd} is not a multiple of --n_head {cfg.n_head}")
    for name in ("micro_batch_size", "sequence_length", "max_steps", "eval_interval", "val_steps",
                 "checkpoint_interval"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, not {getattr(cfg, name)}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"--dtype must be float32 or bfloat16, not {cfg.dtype}")
    grad_accum_steps = cfg.total_batch_size // (B * T * d.world_size)
    dtype = getattr(torch, cfg.dtype if cfg.dtype != "auto" else
                    ("bfloat16" if d.device_type == "cuda" else "float32"))
    use_compile = d.device_type == "cuda" if cfg.compile is None else cfg.compile

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if torch.cuda.is_available():
        torch.cuda.manual_seed(cfg.seed)
    train_loader = DataLoaderLite(B, T, d.rank, d.world_size, "train", cfg.data_root,
                                  shuffle=cfg.shuffle, seed=cfg.seed)
    val_loader = DataLoaderLite(B, T, d.rank, d.world_size, "val", cfg.data_root)
    if d.device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls left

    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                             n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    raw_model = GPT(model_config).to(d.device)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr)

    # resume: weights, optimizer moments, loader position and RNG, from one file
    start_step, val_loss = 0, None
    resume_path, checkpoint = find_checkpoint(cfg, log)
    resumed = checkpoint is not None
    if resumed:
        check_resumable(resume_path, checkpoint, model_config, cfg)
        raw_model.load_state_dict(checkpoint["model"])
        for saved, group in zip(checkpoint["optimizer"]["param_groups"], optimizer.param_groups):
            saved["fused"] = group["fused"]  # fused or not is this machine's choice (CUDA or not)
        optimizer.load_state_dict(checkpoint["optimizer"])
        train_loader.set_state(checkpoint["loader"])
        set_rng_state(checkpoint["rng"])
        start_step, val_loss = checkpoint["step"], checkpoint["val_loss"]
        log(f"resumed from {resume_path} at step {start_step}")
        if checkpoint["world_size"] != d.world_size:  # the stream position is rank-independent
            log(f"the checkpoint was written by {checkpoint['world_size']} processes, this run has "
                f"{d.world_size}: loader positions re-derived from the shared stream position")
        del checkpoint

    # compile once, before DDP; evaluation and sampling use the compiled model too
    model = torch.compile(raw_model, dynamic=False) if use_compile else raw_model
    ddp_model = model
    if d.ddp:
        device_ids = [d.local_rank] if d.device_type == "cuda" else None
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    enc = gpt2_tokenizer() if (cfg.sample or cfg.hellaswag) else None
    if cfg.hellaswag:
        import hellaswag
        try:
            try:
                if d.master_process:
                    hellaswag.download("val")  # once, before the other ranks look for it
            finally:
                if d.ddp:
                    dist.barrier()
            hellaswag.download("val")  # now a no-op (or the same error as rank 0's, on every rank)
            examples = itertools.islice(hellaswag.iterate_examples("val"), cfg.hellaswag_limit or None)
            rendered = [hellaswag.render_example(example, enc) for example in examples]
        except hellaswag.HellaSwagError as e:
            raise UserError(str(e)) from None
        hella_len = hellaswag.pad_length(rendered)  # one shape on every rank: one compilation
        hella_mine = rendered[d.rank::d.world_size]  # example i on rank i % world_size

    # print the derived quantities once
    n_params = sum(p.numel() for p in raw_model.parameters())
    decay, no_decay = (optimizer.param_groups[0]["params"], optimizer.param_groups[1]["params"])
    device_name = torch.cuda.get_device_name(d.device) if d.device_type == "cuda" else d.device
    log(f"device {device_name}, world size {d.world_size}, dtype {str(dtype)[6:]}, "
        f"compile {'on' if use_compile else 'off'}")
    log(f"total batch {cfg.total_batch_size:,} tokens = {B} x {T} tokens x {d.world_size} "
        f"processes x {grad_accum_steps} gradient accumulation steps")
    log(f"{n_params:,} parameters; weight decay on {len(decay)} tensors "
        f"({sum(p.numel() for p in decay):,} parameters), none on {len(no_decay)} "
        f"({sum(p.numel() for p in no_decay):,})")
    log(f"data: {len(train_loader.paths)} train shards, {len(val_loader.paths)} val shards "
        f"in {cfg.data_root}")
    peak = cfg.peak_tflops or (peak_tflops(device_name) if d.device_type == "cuda" else None)
    if d.device_type == "cuda" and not peak:
        log(f"MFU not shown: unknown peak for {device_name} (pass --peak_tflops)")

    # log.txt: a header with the config, then "{step} train|val|hella {value}" lines
    log_file = os.path.join(cfg.log_dir, "log.txt")
    if d.master_process:
        os.makedirs(cfg.log_dir, exist_ok=True)
        if not resumed:
            with open(log_file, "w") as f:  # a fresh run starts an empty log
                f.write(json.dumps(dataclasses.asdict(cfg)) + "\n")
        else:
            trim_log(log_file, start_step)

    def write_log(line):
        if d.master_process:
            with open(log_file, "a") as f:
                f.write(line + "\n")

    def checkpoint_now(step):
        """Rank 0 saves the state *before* training step `step` (the lecture's naming)."""
        if not d.master_process:
            return
        path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
        save_checkpoint(path, {
            "model": raw_model.state_dict(), "config": dataclasses.asdict(model_config),
            "step": step, "val_loss": val_loss, "optimizer": optimizer.state_dict(),
            "train_config": dataclasses.asdict(cfg), "loader": train_loader.state_dict(),
            "world_size": d.world_size, "rng": rng_state()})
        if cfg.keep_checkpoints > 0:  # the newest N up to this one (not a later, abandoned run's)
            older = [p for s, p in list_checkpoints(cfg.log_dir) if s <= step]
            for old in older[:-cfg.keep_checkpoints]:
                os.remove(old)
        log(f"saved {path}")

    stop = StopRequest()
    try:
        for step in range(start_step, cfg.max_steps):
            last_step = step == cfg.max_steps - 1
            evaluate_now = step % cfg.eval_interval == 0 or last_step

            # once in a while: the val loss, on a fixed number of tokens
            if evaluate_now:
                val_loss = evaluate_loss(model, val_loader, cfg.val_steps, d, dtype)
                log(f"validation loss: {val_loss:.4f}")
                write_log(f"{step} val {val_loss:.4f}")

            # HellaSwag: each rank scores its share of the examples, counts summed over ranks
            if cfg.hellaswag and evaluate_now:
                counts = hellaswag.evaluate(model, hella_mine, d.device, seq_len=hella_len,
                                            autocast_dtype=dtype)
                counts = all_reduce_sum(torch.tensor(counts, dtype=torch.float32, device=d.device), d)
                num_correct, num_correct_norm, num_total = (int(c) for c in counts.tolist())
                acc_norm = num_correct_norm / num_total
                log(f"HellaSwag accuracy: {num_correct_norm}/{num_total}={acc_norm:.4f}")
                write_log(f"{step} hella {acc_norm:.4f}")

            # samples from the model (rank 0 only: nothing to reduce)
            if cfg.sample and evaluate_now and step > 0 and d.master_process:
                prompt = enc.encode("Hello, I'm a language model,")
                idx = torch.tensor(prompt, dtype=torch.long, device=d.device).repeat(4, 1)
                sample_rng = torch.Generator(device=d.device)
                sample_rng.manual_seed(42 + d.rank)
                out = generate(model, idx, max_length=32, top_k=50, generator=sample_rng, dtype=dtype,
                               vocab_limit=enc.n_vocab)
                for i in range(out.size(0)):
                    log(f"rank {d.rank} sample {i}: {enc.decode(out[i].tolist())}")

            if step > 0 and (step % cfg.checkpoint_interval == 0 or last_step) and step != start_step:
                checkpoint_now(step)

            # one optimizer step on total_batch_size tokens
            t0 = time.time()
            lr = get_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            loss, norm = train_step(ddp_model, optimizer, train_loader, grad_accum_steps, lr,
                                    cfg.grad_clip, d.device, dtype)
            # one all-reduce for the logged loss and "has any rank been asked to stop?"
            stats = torch.stack([loss, torch.tensor(float(stop.signum is not None), device=d.device)])
            all_reduce_sum(stats, d)
            loss_sum, stop_votes, norm = torch.cat([stats, norm.float().view(1)]).tolist()  # waits
            dt = time.time() - t0
            loss = loss_sum / d.world_size  # the mean over ranks
            tokens_per_sec = cfg.total_batch_size / dt
            mfu_text = f" | mfu {100 * mfu(tokens_per_sec, model_config, T, peak):.1f}%" if peak else ""
            log(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                f"dt {dt * 1000:.2f}ms | tok/sec {tokens_per_sec:.2f}{mfu_text}")
            write_log(f"{step} train {loss:.6f}")
            if stop_votes > 0 and not last_step:
                checkpoint_now(step + 1)
                log(f"stopped by a signal after step {step}; continue with --resume auto")
                break
    finally:
        stop.restore()


def main(argv=None):
    cfg = parse_args(argv)
    d = None
    try:
        d = setup_distributed(cfg.device)
        train(cfg, d)
    except UserError as e:
        if d is None or d.master_process:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if d is not None:
            cleanup_distributed(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
