"""
Reproduce GPT-2 (124M) on 10B tokens of FineWeb-Edu, in one file to read beside the lecture
"Let's reproduce GPT-2 (124M)". The top part is the lecture's file, in its order and with its
names; where it differs (a fix of a known defect, a command line instead of edited constants),
a comment says why, and docs/lecture-map.md lists every difference. Below the banner "Beyond the
lecture" lives what the lecture lacks: checkpoints and exact resume, signals, flag checks, MFU.

    python train_gpt2.py --demo                                 # first: a small GPT-2 on tiny
                                                                # shakespeare, offline, minutes on a CPU
    python fineweb.py                                           # tokenize the data (once)
    python train_gpt2.py                                        # one GPU (or MPS, or CPU)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --resume auto   # after a preemption
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fineweb  # the shards' folder, GPT-2's tokenizer, the atomic write; imports nothing heavy
import hellaswag  # the HellaSwag eval: its data, rendering and scoring (imports nothing heavy)


class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with status 1."""


# -----------------------------------------------------------------------------
# The model: GPT-2, with the module names of Hugging Face's GPT2LMHeadModel

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1
        # regularization
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        # calculate query, key, values for all heads in batch and move head forward to be the batch dim
        # nh is "number of heads", hs is "head size", and C (number of channels) = nh * hs
        # e.g. in GPT-2 (124M), n_head=12, hs=64, so nh*hs=C=768 channels in the Transformer
        qkv = self.c_attn(x)  # (B, T, 3C)
        q, k, v = qkv.split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # flash attention: the (T, T) attention matrix is never written to memory
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        # output projection
        y = self.c_proj(y)
        return y


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, 4C)
        x = self.gelu(x)
        x = self.c_proj(x)  # (B, T, C)
        return x


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        # pre-LayerNorm: the residual stream x is only ever added to
        x = x + self.attn(self.ln_1(x))  # tokens communicate
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # number of tokens: 50,000 BPE merges + 256 bytes tokens + 1 <|endoftext|> token
    n_layer: int = 12  # number of layers
    n_head: int = 12  # number of heads
    n_embd: int = 768  # embedding dimension


# The four GPT-2 sizes OpenAI released (all: vocab_size 50257, block_size 1024).
PRETRAINED = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M params
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M params
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M params
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M params
}
# Hugging Face stores these four weights as Conv1D, (in, out): we transpose them, both ways.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# ... and may keep the causal mask among its tensors: buffers, not weights (we use is_causal)
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config

        # creation order matters: each constructor draws from the RNG, so with
        # torch.manual_seed(1337) this order gives the lecture's initial weights
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings (V, C)
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings (block_size, C)
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),  # a final LayerNorm, which GPT-2 added
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

        # weight sharing scheme: one (V, C) matrix embeds the tokens and scores them (GPT-2,
        # "Attention is all you need"); it saves 38M parameters
        self.transformer.wte.weight = self.lm_head.weight

        # init params (apply visits modules in order, so the tied matrix keeps lm_head's draw)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02  # GPT-2's init; Xavier's 1/sqrt(n_embd) would be 0.036 at 768, 0.025 at 1600
            if hasattr(module, "NANOGPT_SCALE_INIT"):
                # every block adds to the residual stream twice (attention, MLP): scaling these
                # two projections by 1/sqrt(2 * n_layer) keeps its variance from growing with depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        # idx is of shape (B, T)
        B, T = idx.size()
        assert T <= self.config.block_size, f"Cannot forward sequence of length {T}, block size is only {self.config.block_size}"
        # forward the token and position embeddings
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # shape (T)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (T, n_embd)
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (B, T, n_embd)
        x = tok_emb + pos_emb
        # forward the blocks of the transformer
        for block in self.transformer.h:
            x = block(x)
        # forward the final layernorm and the classifier
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:  # the mean cross-entropy over all B*T positions
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @classmethod
    def from_pretrained(cls, model_type):
        """Loads pretrained GPT-2 model weights from huggingface: one of PRETRAINED's names,
        or (beyond the lecture) a local folder written by transformers' save_pretrained."""
        from transformers import GPT2LMHeadModel  # here: only this method needs transformers
        model_hf = GPT2LMHeadModel.from_pretrained(model_type)
        c = model_hf.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd)
        if model_type in PRETRAINED:
            assert PRETRAINED[model_type] == dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
        model = GPT(config)
        sd = model.state_dict()
        # copy while ensuring all of the parameters are aligned and match in names and shapes
        sd_hf = {k: v for k, v in model_hf.state_dict().items() if not k.endswith(HF_BUFFERS)}
        assert set(sd_hf) == set(sd), f"mismatched keys: {sorted(set(sd_hf) ^ set(sd))}"
        with torch.no_grad():
            for k, v in sd_hf.items():
                if k.endswith(HF_TRANSPOSED):
                    v = v.t()  # the openai checkpoints use a "Conv1D" module; we use a vanilla Linear
                assert v.shape == sd[k].shape, f"{k}: {tuple(v.shape)} vs {tuple(sd[k].shape)}"
                sd[k].copy_(v)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        # start with all of the candidate parameters (the tied matrix once) that require grad
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        # create optim groups. Any parameters that is 2D will be weight decayed, otherwise no.
        # i.e. all weight tensors in matmuls + embeddings decay, all biases and layernorms don't.
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        # fused AdamW: one kernel for the whole update instead of a loop over tensors (CUDA)
        use_fused = device_type == "cuda"
        # betas and eps from GPT-3 (appendix B); the lecture printed the groups here, the
        # training loop prints them (no global master_process read inside a method)
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=use_fused)


# -----------------------------------------------------------------------------
# The data loader: token shards written by fineweb.py, a (B, T) batch at a time

def load_tokens(filename):
    """One shard as a read-only memory map of uint16 token ids, (N,). The lecture turned each
    shard into an int64 tensor (800 MB per rank per 100M-token shard); a
    memory map reads only the B*T+1 tokens of each batch from disk."""
    try:
        npt = np.load(filename, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # also pickled Python objects: never unpickled
        raise UserError(f"{filename} is not a token shard of fineweb.py ({type(e).__name__})") from None
    if npt.ndim != 1 or npt.dtype != np.uint16:
        raise UserError(f"{filename} is not a 1-D uint16 token shard (it holds {npt.dtype}, shape "
                        f"{npt.shape}): write it with fineweb.py")
    return npt


class DataLoaderLite:
    """(B, T) batches of one split's shards. One process reads the lecture's stream: offsets 0,
    B*T, 2*B*T, ... into a shard, then the next shard, wrapping around after the last. Fixes:
    - N processes: rank r takes micro-batches r, r+N, ... of that stream, so no rank drops a
      batch or runs ahead at a shard's end (the lecture's did), and N ranks see the tokens of one
      process with N times the accumulation (in the step that crosses a shard's end, some
      ranks may read the old shard while others read the new one).
    - shuffle=True: a fresh seeded order of the shards and of their batches every epoch.
    The position (epoch, current_shard, current_position) is every rank's, whatever N is."""

    def __init__(self, B, T, process_rank, num_processes, split, data_root=fineweb.LOCAL_DIR,
                 shuffle=False, seed=0):
        self.B, self.T = B, T
        self.process_rank = process_rank
        self.num_processes = num_processes
        self.shuffle, self.seed = shuffle, seed
        assert split in {"train", "val"}

        # get the shard filenames (listed, not globbed: a folder name may hold "[" or "*")
        if not os.path.isdir(data_root):
            raise UserError(f"data folder {data_root} does not exist: run `python fineweb.py` first")
        shards = sorted(s for s in os.listdir(data_root) if split in s and s.endswith(".npy"))
        self.shards = [os.path.join(data_root, s) for s in shards]
        if not shards:
            hint = ("the corpus filled only the val shard: rerun fineweb.py with a smaller "
                    "--shard_size" if split == "train" and any("val" in s for s in os.listdir(data_root))
                    else "run `python fineweb.py` first")
            raise UserError(f"no {split} shards in {data_root}: {hint}")
        self.tokens = [load_tokens(s) for s in self.shards]  # memory maps: all stay open, cheaply
        # batch k of a shard reads tokens [k*B*T, (k+1)*B*T + 1): the targets are shifted by one
        self.batches_per_shard = [max(0, (len(t) - 1) // (B * T)) for t in self.tokens]
        if sum(self.batches_per_shard) == 0:
            raise UserError(f"the {split} shards in {data_root} hold fewer than B*T+1 = "
                            f"{B * T + 1} tokens each: use a smaller --micro_batch_size or "
                            "--sequence_length, or more data")
        self.reset()

    def reset(self):
        self.set_state(dict(epoch=0, shard=0, batch=0))

    def state_dict(self):
        """The stream position, the same on every rank, in plain ints (for the checkpoint)."""
        return dict(epoch=self.epoch, shard=self.current_shard,
                    batch=self.current_position // (self.B * self.T))

    def set_state(self, state):
        if not (0 <= state["shard"] < len(self.shards) and state["batch"] >= 0):
            raise UserError(f"the saved loader position (shard {state['shard']}) is past the "
                            f"{len(self.shards)} shards in {os.path.dirname(self.shards[0])}: "
                            "resume on the data the run was trained on")
        self.epoch, self.current_shard = state["epoch"], state["shard"]
        self.current_position = state["batch"] * self.B * self.T  # tokens into the shard's stream
        self._plan()
        self._skip_used_up()  # e.g. a shard too small for one batch

    def _plan(self):
        """This epoch's order of the shards and the current shard's order of its batches: as
        they lie, or (shuffle) seeded permutations."""
        def order(n, *key):
            rng = np.random.default_rng([self.seed, self.epoch, *key])
            return rng.permutation(n).tolist() if self.shuffle else range(n)
        self.shard_order = order(len(self.shards))
        shard = self.shard_order[self.current_shard]
        self.batch_order = order(self.batches_per_shard[shard], shard)

    def _skip_used_up(self):
        """Go to the next shard (wrapping around: a new epoch) while this one has no batch left."""
        while self.current_position // (self.B * self.T) >= len(self.batch_order):
            self.current_shard, self.current_position = self.current_shard + 1, 0
            if self.current_shard == len(self.shards):
                self.current_shard, self.epoch = 0, self.epoch + 1
            self._plan()

    def next_batch(self):
        """This rank's next (x, y), each (B, T) int64: the inputs and the targets, shifted by one."""
        B, T = self.B, self.T
        for rank in range(self.num_processes):  # the stream's next N micro-batches: ours is one
            if rank == self.process_rank:
                tokens = self.tokens[self.shard_order[self.current_shard]]
                start = self.batch_order[self.current_position // (B * T)] * B * T
                buf = torch.from_numpy(tokens[start:start + B * T + 1].astype(np.int64))
            self.current_position += B * T
            self._skip_used_up()
        x = (buf[:-1]).view(B, T)  # inputs
        y = (buf[1:]).view(B, T)  # targets
        return x, y


# -----------------------------------------------------------------------------
# HellaSwag: the lecture's get_most_likely_row(tokens, mask, logits) is hellaswag.score(),
# batched in fixed shapes, so that a compiled model evaluates too (the lecture's skipped it)

# -----------------------------------------------------------------------------
# The learning rate: linear warmup, then cosine decay to 10% of the maximum (GPT-3, B.1)

def get_lr(it, max_lr, min_lr, warmup_steps, max_steps):
    # 1) linear warmup for warmup_steps steps (step 0 already gets a small, non-zero rate)
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    # 2) if it > max_steps, return min learning rate
    if it > max_steps:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff starts at 1 and goes to 0
    return min_lr + coeff * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# The configuration: the lecture's constants, as command-line flags (README: "Flags")

def flag(default, help, low=None, choices=None):
    """A TrainConfig field with its --help text and the values it may take (at least `low`,
    or one of `choices`), which parse_args checks before anything starts."""
    return field(default=default, metadata=dict(help=help, low=low, choices=choices))


@dataclass
class TrainConfig:
    # files
    data_root: str = flag(fineweb.LOCAL_DIR, "token shards written by fineweb.py")
    log_dir: str = flag("log", "log.txt, config.json and the checkpoints model_{step:05d}.pt")
    demo: bool = flag(False, "a small GPT-2 on tiny shakespeare (assets/): every stage, offline, in minutes")
    # the model: GPT-2 124M, its vocabulary padded 50257 -> 50304 = 393 * 128 (faster kernels)
    model: str = flag("gpt2", "gpt2, gpt2-medium, -large or -xl: a shape and its training defaults",
                      choices=tuple(PRETRAINED))
    init_from: str = flag("", "a new run from OpenAI's weights (gpt2, ...) or a checkpoint's; none: random")
    n_layer: int = flag(12, "transformer blocks", low=1)
    n_head: int = flag(12, "attention heads per block", low=1)
    n_embd: int = flag(768, "channels C of the residual stream", low=1)
    block_size: int = flag(1024, "longest context, tokens (GPT-2's n_ctx)", low=1)
    vocab_size: int = flag(50304, "vocabulary; the ids past GPT-2's 50257 are never seen", low=1)
    # the batch: 2**19 tokens per optimizer step, GPT-3 small's 0.5M (GPT-3 paper, table 2.1)
    micro_batch_size: int = flag(64, "B: sequences per forward/backward on each process", low=1)
    sequence_length: int = flag(1024, "T: tokens per sequence", low=1)
    total_batch_size: int = flag(524288, "tokens per optimizer step, all processes together", low=1)
    # the optimizer and its schedule (GPT-3 paper, appendix B)
    max_steps: int = flag(19073, "optimizer steps: 10e9 tokens / 2**19 = one epoch of the 10B sample", low=1)
    warmup_steps: int = flag(715, "linear warmup steps: GPT-3's 375M tokens / 2**19", low=0)
    max_lr: float = flag(6e-4, "peak learning rate (GPT-3 small)", low=0)
    min_lr: float = flag(6e-5, "learning rate at the end of the cosine: 10% of max_lr", low=0)
    weight_decay: float = flag(0.1, "AdamW weight decay of matmul weights and embeddings", low=0)
    grad_clip: float = flag(1.0, "largest global gradient norm (0: no clipping)", low=0)
    shuffle: bool = flag(False, "shuffle shards and batches every epoch (the lecture reads in order)")
    # evaluation, sampling, checkpoints
    eval_interval: int = flag(250, "steps between evaluations (val, HellaSwag, samples), and at the last step", low=1)
    val_steps: int = flag(20, "val micro-batches per evaluation, all processes together", low=1)
    hellaswag: bool = flag(True, "HellaSwag accuracy (acc_norm) at every evaluation")
    hellaswag_limit: int = flag(0, "only the first N HellaSwag examples (0: all 10,042)", low=0)
    sample: bool = flag(True, "print 4 samples per process at every evaluation but step 0's")
    wandb: str = flag("", "log to Weights & Biases in this project (none: off); pip install wandb")
    wandb_run_name: str = flag("", "the wandb run's name (none: the log folder's name)")
    tensorboard: bool = flag(False, "log to TensorBoard in <log_dir>/tb; pip install tensorboard")
    checkpoint_interval: int = flag(5000, "steps between checkpoints; one more before and one after the last step", low=1)
    keep_checkpoints: int = flag(0, "keep only the newest N checkpoints (0: keep all)", low=0)
    resume: str = flag("", "auto: the newest checkpoint in log_dir, or a checkpoint's path; none: start fresh")
    overwrite: bool = flag(False, "start fresh in a log_dir that holds checkpoints, deleting them")
    # the machine
    device: str = flag("auto", "cuda, mps or cpu (auto: the first there is)")
    fsdp: bool = flag(False, "torchrun: shard weights, gradients, AdamW state (FSDP2), not DDP")
    ddp_timeout: int = flag(1800, "torchrun: seconds a process waits for the others (a 1.5B save) before it fails", low=1)
    activation_checkpointing: bool = flag(False, "recompute activations in the backward: less memory")
    dtype: str = flag("auto", "autocast dtype, or auto: bfloat16 on GPUs of compute capability 8.0+, float16 + "
                      "scaler on older ones, float32 off CUDA", choices=("auto", "float32", "bfloat16", "float16"))
    compile: str = flag("auto", "torch.compile: 1, 0 or auto (CUDA with Triton)", choices=("auto", "1", "0"))
    seed: int = flag(1337, "random seed (the lecture's)", low=0)
    peak_tflops: float = flag(0.0, "accelerator peak TFLOPS for MFU (0: look the GPU up)", low=0)


# -----------------------------------------------------------------------------
# One optimizer step (bench.py times this very function)

def train_step(model, optimizer, scaler, train_loader, grad_accum_steps, lr, grad_clip, device, dtype):
    """Accumulates the gradient of one total batch, clips it, takes one AdamW step. Returns
    this rank's loss and the norm before clipping, as tensors: the caller decides when to
    wait for the GPU (the lecture's loop body, as a function so that bench.py can time it)."""
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = train_loader.next_batch()
        if device.startswith("cuda"):  # pinned memory: the copy overlaps with GPU work
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # all-reduce the gradients only on the last micro-step (set before its forward)
        if isinstance(model, DDP):
            model.require_backward_grad_sync = (micro_step == grad_accum_steps - 1)
        elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2's switch for the same
            model.set_requires_gradient_sync(micro_step == grad_accum_steps - 1)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            logits, loss = model(x, y)
        # the loss is a mean over B*T tokens; dividing by the number of micro-steps makes the
        # summed gradient the gradient of the mean over the whole total batch
        loss = loss / grad_accum_steps
        loss_accum += loss.detach()
        # float16 only: scale the loss up so that small gradients do not round to 0
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # float16 only: clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
        norm = norm.full_tensor()
    # determine and set the learning rate for this iteration
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    # = optimizer.step(), unless float16 gradients overflowed, or (beyond the lecture) the norm is nan/inf
    step_if_finite(optimizer, scaler, norm)
    return loss_accum, norm


# -----------------------------------------------------------------------------
# The training loop (the lecture runs it at module level; here main() calls it)

def train(cfg, stop):
    # set up DDP (distributed data parallel).
    # torchrun command sets the env variables RANK, LOCAL_RANK, and WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1  # is this a ddp run?
    device = pick_device(cfg.device)  # the flag's, checked, or cuda > mps > cpu
    if ddp:
        ddp_rank = int(os.environ["RANK"])
        ddp_local_rank = int(os.environ["LOCAL_RANK"])
        ddp_world_size = int(os.environ["WORLD_SIZE"])
        if device == "cuda":
            device = f"cuda:{ddp_local_rank}"
            torch.cuda.set_device(device)
        # the lecture's DDP needed CUDA (NCCL); gloo runs it on CPUs too (beyond it: bounded waits)
        init_process_group("nccl" if device.startswith("cuda") else "gloo", cfg.ddp_timeout)
    else:
        ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
    master_process = ddp_rank == 0  # this process will do logging, checkpointing etc.
    device_type = "cuda" if device.startswith("cuda") else device
    log = print if master_process else (lambda *args, **kwargs: None)

    torch.manual_seed(cfg.seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(cfg.seed)

    enc = fineweb.gpt2_encoding()  # tiktoken's "gpt2", built from the files in assets/: no download

    total_batch_size = cfg.total_batch_size  # 2**19, ~0.5M, in number of tokens
    B = cfg.micro_batch_size  # micro batch size
    T = cfg.sequence_length  # sequence length
    assert total_batch_size % (B * T * ddp_world_size) == 0, "make sure total_batch_size is divisible by B * T * ddp_world_size"
    grad_accum_steps = total_batch_size // (B * T * ddp_world_size)

    train_loader = DataLoaderLite(B=B, T=T, process_rank=ddp_rank, num_processes=ddp_world_size, split="train",
                                  data_root=cfg.data_root, shuffle=cfg.shuffle, seed=cfg.seed)
    val_loader = DataLoaderLite(B=B, T=T, process_rank=ddp_rank, num_processes=ddp_world_size, split="val",
                                data_root=cfg.data_root)

    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls that remain

    # create model
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    model.to(device)
    # the plain GPT: what is saved. It is taken before compiling (whose state_dict prefixes
    # every name with "_orig_mod.") rather than as model.module after DDP, as the lecture does
    raw_model = model
    if cfg.init_from:  # beyond the lecture: start from OpenAI's or one of our checkpoints' weights
        init_weights(raw_model, cfg.init_from)
    if cfg.activation_checkpointing:  # beyond the lecture: recompute activations in the backward
        checkpoint_blocks(raw_model)
    dtype, dtype_why = pick_dtype(cfg.dtype, device)
    use_compile, compile_why = pick_compile(cfg.compile, device_type)
    if use_compile and not (ddp and cfg.fsdp):  # FSDP: each block compiled in shard_model
        # evaluation and sampling use fixed shapes: compile stays on for them (the lecture's was off)
        model = torch.compile(model, dynamic=False)
    if ddp and cfg.fsdp:  # beyond the lecture: FSDP2 shards weights, gradients and AdamW state
        shard_model(raw_model, use_compile)
    elif ddp:
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)

    optimizer = raw_model.configure_optimizers(weight_decay=cfg.weight_decay, learning_rate=cfg.max_lr,
                                               device_type=device_type)
    # float16 (GPUs without bf16) needs loss scaling; for other dtypes the scaler does nothing
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)

    # beyond the lecture: continue a run from its checkpoint (weights, optimizer, loader, RNG)
    start_step = maybe_resume(cfg, raw_model, optimizer, scaler, train_loader, log)
    # HellaSwag: render the val examples once; each rank keeps its share (example i: rank i % N)
    hella = load_hellaswag(cfg, enc, ddp_rank, ddp_world_size) if cfg.hellaswag else None

    # print the derived quantities once
    log(f"total batch {total_batch_size:,} tokens = {B} x {T} tokens x {ddp_world_size} "
        f"processes x {grad_accum_steps} gradient accumulation steps")
    peak = report_start(cfg, device, dtype, dtype_why, use_compile, compile_why, raw_model,
                        optimizer, train_loader, val_loader, ddp_world_size, log)
    flops = flops_per_token(raw_model, T)  # per token, for MFU

    # the log file: "{step} train|val|hella {value}" lines, as the lecture writes them (and wandb, TensorBoard)
    log_file = os.path.join(cfg.log_dir, "log.txt")
    run_log = RunLog(cfg, log_file, start_step, master_process)  # beyond the lecture: rank 0 writes them

    def checkpoint(step, val_loss=None):  # the state before optimizer step `step`
        save_checkpoint(cfg, step, raw_model, optimizer, scaler, train_loader, val_loss, ddp_world_size, master_process, log)
    nonfinite = NonFiniteSteps(cfg, scaler, log)  # beyond the lecture: nan/inf steps are skipped, 5 in a row stop

    amp = dict(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)
    if stop.vote(ddp, device):  # SIGTERM / Ctrl-C while starting up: nothing to save yet
        log("stopped by a signal before the first step; nothing to save")
        return
    for step in range(start_step, cfg.max_steps):
        last_step = (step == cfg.max_steps - 1)
        evaluate = step % cfg.eval_interval == 0 or last_step

        # once in a while evaluate our validation loss
        val_loss = None
        if evaluate:
            t_eval = time.time()  # beyond the lecture: each evaluation says how long it took
            model.eval()
            val_loader.reset()
            with torch.no_grad():
                val_loss_accum = torch.zeros((), device=device)
                # val_steps micro-batches in all, rank r taking r, r+N, ...: the lecture took
                # 20 per rank, so its val loss changed with the number of GPUs.
                # Every rank makes as many passes (FSDP's are collectives); a spare one counts 0.
                for i in range(ddp_rank, -(-cfg.val_steps // ddp_world_size) * ddp_world_size, ddp_world_size):
                    x, y = val_loader.next_batch()
                    x, y = x.to(device), y.to(device)
                    with torch.autocast(**amp):
                        logits, loss = model(x, y)
                    val_loss_accum += loss.detach() / cfg.val_steps * (i < cfg.val_steps)
            if ddp:
                dist.all_reduce(val_loss_accum, op=dist.ReduceOp.SUM)  # gloo has no AVG
            val_loss, eval_time = val_loss_accum.item(), time.time() - t_eval
            log(f"validation loss: {val_loss:.4f} ({eval_time:.1f}s)")
            run_log.val(step, val_loss, eval_time)

        # every checkpoint_interval steps and at the last step: the state before this step
        if step > 0 and (step % cfg.checkpoint_interval == 0 or last_step) and step != start_step:
            checkpoint(step, val_loss)

        # once in a while evaluate hellaswag
        if cfg.hellaswag and evaluate:
            t_eval = time.time()
            model.eval()
            counts = hellaswag.evaluate(model, hella["examples"], device, seq_len=hella["seq_len"],
                                        num_batches=hella["num_batches"], autocast_dtype=dtype,
                                        progress=master_process, should_stop=lambda: stop.vote(ddp, device))
            if counts is None:  # a signal during the evaluation: save the state before this step
                checkpoint(step)
                log(f"stopped by a signal during the HellaSwag evaluation of step {step}; continue with --resume auto")
                break
            # reduce the stats across all processes
            counts = torch.tensor(counts[1:], dtype=torch.long, device=device)
            if ddp:
                dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            num_correct_norm, num_total = counts.tolist()
            acc_norm, eval_time = num_correct_norm / num_total, time.time() - t_eval
            log(f"HellaSwag accuracy: {num_correct_norm}/{num_total}={acc_norm:.4f} ({eval_time:.1f}s)")
            run_log.hella(step, acc_norm, eval_time)

        # once in a while generate from the model (except step 0, which is noise)
        if cfg.sample and evaluate and step > 0:
            t_eval = time.time()
            model.eval()
            num_return_sequences = 4
            max_length = 32
            tokens = enc.encode("Hello, I'm a language model,")
            tokens = torch.tensor(tokens, dtype=torch.long)
            tokens = tokens.unsqueeze(0).repeat(num_return_sequences, 1)  # (4, 8)
            # a fixed (4, 32) buffer, filled left to right: the model sees one shape, so it
            # compiles once (the lecture's growing xgen recompiled at every length).
            # Causal attention: the zeros right of position t cannot change the logits at t.
            xgen = torch.zeros(num_return_sequences, max_length, dtype=torch.long, device=device)
            xgen[:, :tokens.size(1)] = tokens
            sample_rng = torch.Generator(device=device)
            sample_rng.manual_seed(42 + ddp_rank)
            for t in range(tokens.size(1), max_length):
                # forward the model to get the logits
                with torch.no_grad():
                    with torch.autocast(**amp):
                        logits, loss = model(xgen)  # (B, T, vocab_size)
                    # the logits that predict position t; only real tokens: ids past the
                    # tokenizer's 50257 are vocabulary padding, with no text to decode
                    logits = logits[:, t - 1, :enc.n_vocab]  # (B, 50257)
                    # get the probabilities
                    probs = F.softmax(logits.float(), dim=-1)
                    # do top-k sampling of 50 (huggingface pipeline default)
                    # topk_probs here becomes (4, 50), topk_indices is (4, 50)
                    topk_probs, topk_indices = torch.topk(probs, 50, dim=-1)
                    # select a token from the top-k probabilities
                    # note: multinomial does not demand the input to sum to 1
                    ix = torch.multinomial(topk_probs, 1, generator=sample_rng)  # (B, 1)
                    # gather the corresponding indices and write them at position t
                    xgen[:, t] = torch.gather(topk_indices, -1, ix).squeeze(-1)
            # print the generated text, after how long it took (rank 0's also go to wandb, TensorBoard)
            decoded = [enc.decode(xgen[i, :max_length].tolist()) for i in range(num_return_sequences)]
            eval_time = time.time() - t_eval
            log(f"{num_return_sequences} samples ({eval_time:.1f}s):")
            run_log.samples(step, decoded, eval_time)
            for i in range(num_return_sequences):
                print(f"rank {ddp_rank} sample {i}: {decoded[i]}")

        # do one step of the optimization; t0 here, not at the top of the loop as in the
        # lecture, so that dt is the step alone and not the evaluations before it
        t0 = time.time()
        model.train()
        lr = get_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        loss_accum, norm = train_step(model, optimizer, scaler, train_loader, grad_accum_steps,
                                      lr, cfg.grad_clip, device, dtype)
        # one all-reduce for the loss (summed: gloo has no AVG) and for "stop?": a signal to any
        # rank stops every rank at the same step. .tolist() waits for the GPU to finish.
        stats = torch.stack([loss_accum, torch.tensor(float(stop.requested), device=device)])
        if ddp:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        loss_sum, stop_votes, norm = torch.cat([stats, norm.float().view(1)]).tolist()
        t1 = time.time()
        dt = t1 - t0  # time difference in seconds
        loss_accum = loss_sum / ddp_world_size  # the mean over the ranks
        tokens_processed = B * T * grad_accum_steps * ddp_world_size
        tokens_per_sec = tokens_processed / dt  # all processes together
        # MFU per GPU: each GPU's share of the tokens against one GPU's peak
        step_mfu = mfu(tokens_per_sec / ddp_world_size, flops, peak) if peak else None
        eta = run_log.train(step, loss_accum, lr, norm, dt, tokens_per_sec, step_mfu)  # and the time left
        log(f"step {step:5d} | loss {loss_accum:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt: {dt * 1000:.2f}ms | "
            f"tok/sec: {tokens_per_sec:.2f}{f' | mfu {100 * step_mfu:.1f}%' if peak else ''} | eta {eta}")
        nonfinite.check(step, loss_accum, norm)  # a warning per nan/inf step; 5 in a row: stop
        if stop_votes > 0 and not last_step:  # SIGTERM (preemption) or Ctrl-C: save, stop
            checkpoint(step + 1)
            log(f"stopped by a signal after step {step}; continue with --resume auto")
            break
    else:
        # the loop ran to the end: also keep the trained weights, after the last step
        checkpoint(cfg.max_steps)
    run_log.close()  # wandb and TensorBoard write their last points; main() destroys the process group


# =============================================================================
# Beyond the lecture: devices and dtypes, checkpoints and exact resume, signals, the log
# folder, wandb and TensorBoard, the time left, command-line parsing and checks, MFU, main()
# =============================================================================

# -----------------------------------------------------------------------------
# The device, the dtype, torch.compile: each picked (or checked) with a reason to print

def pick_device(name):
    """'cuda', 'mps' or 'cpu': the one asked for, if this machine has it, else the first there is."""
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    kind = name.split(":")[0]
    if kind not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device must be cuda, mps or cpu, not {name}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch has no usable CUDA "
                        f"(torch {torch.__version__}, {torch.cuda.device_count()} GPUs visible)")
    if kind == "mps" and not has_mps:
        raise UserError(f"--device {name}: MPS is not available on this machine")
    return name


def device_name(device):
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


def pick_dtype(name, device):
    """(autocast dtype, why): the one dtype choice of the trainer and of every tool. bfloat16
    needs no gradient scaler; float16 does. auto: bfloat16 only where `device` (the run's own
    GPU, not the current one) computes in it, compute capability 8.0 (Ampere) or more, or
    ROCm. torch.cuda.is_bf16_supported() also counts emulated bfloat16, which a V100 or T4
    runs very slowly and Inductor does not compile: those train in float16 with a scaler."""
    if name == "auto":
        if device.startswith("cuda"):
            major, minor = torch.cuda.get_device_capability(device)
            if torch.version.hip or (major, minor) >= (8, 0):
                return torch.bfloat16, f"auto: compute capability {major}.{minor} has bfloat16"
            return torch.float16, (f"auto: compute capability {major}.{minor} has no bfloat16, "
                                   "so float16 with a gradient scaler")
        return torch.float32, f"auto: float32 on {device}"
    return getattr(torch, name), ("with a gradient scaler" if name == "float16" else "--dtype")


def pick_compile(value, device_type):
    """(compile?, why) for --compile auto|1|0. On CUDA torch.compile needs Triton, which
    Windows lacks: auto then runs eager, and an explicit 1 is an error now, not at step 0."""
    triton = device_type != "cuda" or _has_triton()
    if value == "auto":
        if not triton:
            return False, "auto: torch.compile needs Triton on CUDA, and there is none here"
        return device_type == "cuda", f"auto: {'on' if device_type == 'cuda' else 'off'} on {device_type}"
    if value == "1" and not triton:
        raise UserError("--compile 1: torch.compile needs Triton on CUDA and it is not installed "
                        "(Windows has none): use --compile 0")
    return value == "1", "--compile"


def _has_triton():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def load_hellaswag(cfg, enc, rank, world_size):
    """This rank's share of the rendered val examples, the one padded length, and the number of
    forward passes: the same on every rank, so that the passes' stop votes (and FSDP's
    collectives) line up."""
    try:
        if rank == 0:
            hellaswag.download("val")  # once, before the other ranks look for it
        if world_size > 1:
            dist.barrier()
        examples = list(hellaswag.iterate_examples("val"))[:cfg.hellaswag_limit or None]
    except hellaswag.HellaSwagError as e:
        raise UserError(f"{e}; or pass --hellaswag 0, or a small --hellaswag_limit") from None
    rendered = [hellaswag.render_example(example, enc) for example in examples]
    seq_len = hellaswag.pad_length(rendered)  # computed on all examples: one shape on every rank
    if seq_len > cfg.block_size:
        raise UserError(f"HellaSwag needs sequences of {seq_len} tokens; --block_size is "
                        f"{cfg.block_size}: raise it, or pass --hellaswag 0")
    per_rank = math.ceil(len(rendered) / world_size)
    return dict(examples=rendered[rank::world_size], seq_len=seq_len,
                num_batches=math.ceil(per_rank / hellaswag.BATCH_SIZE))


# -----------------------------------------------------------------------------
# Bigger models: GPT-2's other sizes, their weights, activation checkpointing, FSDP2

# --model: each of GPT-2's four shapes (PRETRAINED) trains with the learning rate and batch of
# the nearest GPT-3 model (GPT-3 paper, table 2.1) and the 124M run's rules: warmup over 375M
# tokens, 10B tokens in all, min_lr = 10% of max_lr. micro_batch_size: the largest power of 2
# whose memory estimate (bfloat16, eager, one GPU) stays under 60 GB, room kept on an 80 GB GPU.
PRESETS = {
    "gpt2": dict(),  # GPT-3 Small (125M): lr 6e-4, 0.5M tokens: TrainConfig's own defaults
    "gpt2-medium": dict(max_lr=3e-4, min_lr=3e-5, micro_batch_size=32),  # GPT-3 Medium (350M): 3e-4, 0.5M
    "gpt2-large": dict(max_lr=2.5e-4, min_lr=2.5e-5, micro_batch_size=16),  # GPT-3 Large (760M): 2.5e-4, 0.5M
    "gpt2-xl": dict(max_lr=2e-4, min_lr=2e-5, total_batch_size=2**20, micro_batch_size=8,  # GPT-3 XL
                    warmup_steps=int(375e6 / 2**20), max_steps=int(10e9 / 2**20)),  # (1.3B): 2e-4, 1M
}


# --demo: every stage of the real run (train and val loss, HellaSwag on a slice of its val set,
# samples, checkpoints, log.txt, config.json and a plot) in a couple of minutes on a laptop CPU,
# with no download: a 4-layer GPT-2 on tiny shakespeare, the text the lecture starts from, whose
# tokens fineweb.py writes as shards on first use (a val shard of 32k tokens, 10 train shards).
DEMO = dict(data_root=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_demo"),
            log_dir="log_demo", n_layer=4, n_head=4, n_embd=128, block_size=256,
            micro_batch_size=8, sequence_length=128, total_batch_size=1024, max_steps=150,
            warmup_steps=10, max_lr=2e-3, min_lr=2e-4, eval_interval=75, val_steps=8,
            hellaswag_limit=40, checkpoint_interval=75)
DEMO_SHARD_SIZE = 32768  # tokens per shard of tiny shakespeare's 338,026


def write_demo_shards(cfg):
    """--demo's data: tiny shakespeare's shards in --data_root, written by fineweb.py's own code
    on first use (by a node's first process; the others wait for it). Later runs find them done."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        # on a shared filesystem each node's first process takes the folder in turn (waiting
        # for the one that writes it), then finds the shards done
        os.makedirs(cfg.data_root, exist_ok=True)
        fineweb.lock_folder(cfg.data_root, fineweb.LOCK, "", wait=True)
        try:
            fineweb.main(["--data_files", fineweb.asset_path("tinyshakespeare", "input.txt"), "--local_dir",
                          cfg.data_root, "--shard_size", str(DEMO_SHARD_SIZE), "--num_proc", "1"])
        finally:
            fineweb.release_folder(cfg.data_root, fineweb.LOCK)
        return
    manifest = os.path.join(cfg.data_root, "manifest.json")
    for _ in range(600):
        if os.path.exists(manifest):
            with open(manifest) as f:
                if json.load(f)["done"]:
                    return
        time.sleep(0.5)
    raise UserError(f"the demo's shards did not appear in {cfg.data_root} within 5 minutes")


def init_weights(model, source):
    """--init_from: OpenAI's weights, their 50257-token vocabulary padded with rows of zeros
    (logit 0 for the padding ids), or the weights of one of our checkpoints."""
    if source in PRETRAINED:
        other = load_model(model_type=source)
    else:
        other = model_from_checkpoint(load_checkpoint(source), source)
    a, b = other.config, model.config
    if (a.n_layer, a.n_head, a.n_embd) != (b.n_layer, b.n_head, b.n_embd) or a.vocab_size > b.vocab_size \
            or a.block_size < b.block_size:
        raise UserError(f"--init_from {source} is a {a} model, which does not fit this run's {b}: "
                        f"pass the matching --model (or shape flags)")
    theirs = other.state_dict()
    with torch.no_grad():  # the first rows of wte/lm_head (vocabulary) and wpe (positions)
        for name, weight in model.state_dict().items():
            weight.zero_()[:len(theirs[name])] = theirs[name][:len(weight)]


def checkpoint_blocks(model):
    """--activation_checkpointing: each Block keeps only its input for the backward, where it
    runs its forward again (torch.utils.checkpoint, non-reentrant): the same gradients."""
    from torch.utils.checkpoint import checkpoint
    for block in model.transformer.h:
        # a function of this file, not a functools.partial of checkpoint: a block compiled on
        # its own (FSDP) has Dynamo trace this frame and take checkpoint() in; Dynamo skips
        # checkpoint's own frame, and the block's forward under it would run eager
        block.forward = lambda x, forward=block.forward: checkpoint(forward, x, use_reentrant=False)


def shard_model(model, compile_blocks=False):
    """--fsdp: FSDP2 in place, each Block a unit and the root the rest, the tied wte/lm_head
    with it (a tied weight must stay in one unit). Each rank keeps 1/N of the weights,
    gradients and AdamW state and gathers a unit's weights when it runs.
    --compile: torch's order for FSDP2, each block wrapped for activation checkpointing (done
    before), then compiled, then sharded, then the root sharded. Compiling the whole model
    instead compiles only the blocks (Dynamo skips FSDP2's hooks, so GPT.forward's frame is
    skipped), and with activation checkpointing nothing at all. The root (embeddings, ln_f,
    lm_head, the loss) runs eager: compiled whole, its frame breaks at every FSDP2 unit.
    Module.compile() compiles in place: the state_dict's names stay the plain model's."""
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        if compile_blocks:
            block.compile(dynamic=False)
        fully_shard(block)
    fully_shard(model)


def estimate_memory(cfg, n_params, dtype, world_size):
    """Bytes per GPU of (weights, gradients, AdamW state, activations, the peak of a step), from
    the tensors an eager step keeps (measured on CPU to within a few %; torch.compile keeps
    fewer, CUDA's allocator and context add some). The peak is the loss's backward, with every
    activation alive, or the optimizer step. The gradients are those of the peak: with gradient
    accumulation the sums of the earlier micro-steps live through the later ones, and under
    FSDP unsharded: with the sync off (set_requires_gradient_sync) every rank keeps the whole
    gradient until the last micro-step reduce-scatters it."""
    L, C, V, BT = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.micro_batch_size * cfg.sequence_length
    shard = world_size if cfg.fsdp else 1
    accumulating = cfg.total_batch_size > BT * world_size  # more than one micro-step
    weights, step_grads, adam = 4 * n_params / shard, 4 * n_params / shard, 8 * n_params / shard
    held = 4 * n_params if accumulating else 0  # alive during a later micro-step, unsharded
    grads = max(step_grads, held)
    # the tied wte/lm_head's gradient, computed first in the backward: a new tensor beside the held
    # sum until it is added in; under FSDP also the root unit's flat copy for the reduce-scatter
    fresh = 4 * V * C if accumulating else 0
    scatter = 4 * V * C * (1 + 1 / shard) if cfg.fsdp else 0
    if cfg.fsdp:  # the root unit (wte/lm_head) stays whole; two blocks gathered at a time
        weights += 4 * (V * C + 2 * (12 * C * C + 13 * C))
    static = weights + adam + (4 * n_params if world_size > 1 and not cfg.fsdp else 0)  # DDP's buckets
    half = dtype != torch.float32
    # saved per token and layer: 16 vectors of C (the LayerNorms' inputs and outputs, q, k, v,
    # attention's output, the MLP's 4C input and output), all float32, or under autocast the
    # LayerNorm inputs float32 and the rest half; with checkpointing only the block's input
    block = (8 * C + 28 * C) if half else 64 * C
    per_layer = 4 * C if cfg.activation_checkpointing else block
    logits = (2 if half else 4) * V  # and the loss's float32 log-softmax, 4V
    casts = 2 * (V * C + (0 if cfg.activation_checkpointing else 12 * L * C * C)) if half else 0
    activations = BT * (L * per_layer + 8 * C + logits + 4 * V) + casts
    peak = max(static + held + fresh + activations + BT * 8 * V,  # + the two (B, T, V) gradients of the loss
               static + grads + scatter + BT * (logits + block + 20 * C),  # a block's backward
               static + step_grads + BT * logits + 8 * max(V * C, 4 * C * C) / shard)  # AdamW
    return weights, grads, adam, activations, peak


# -----------------------------------------------------------------------------
# The process group: waits that end, and torchrun's restarts

def init_process_group(backend, timeout_s):
    """The process group of torchrun's processes, with two fixes:
    - every wait on another process (the start, a collective) fails after timeout_s seconds
      instead of hanging on a process that died or hangs (NCCL: with torchrun's
      TORCH_NCCL_ASYNC_ERROR_HANDLING, its watchdog aborts the process);
    - torchrun --max-restarts keeps one TCPStore for all attempts of a run (its rendezvous
      store, shared with the workers), so the keys that the process group of a dead attempt
      wrote, such as each rank's gloo/NCCL address, are still there when the restarted workers
      start: one of them may read the dead peer's address and fail to connect, or wait forever.
      Each attempt's keys get a prefix of their own."""
    from datetime import timedelta
    timeout = timedelta(seconds=timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            dist.init_process_group(backend=backend, timeout=timeout)  # env://: a store of its own
            return
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=timeout)  # torchrun's agent serves it
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"train_gpt2/attempt{attempt}", store),
                                rank=rank, world_size=world_size, timeout=timeout)
    except RuntimeError as e:  # DistStoreError, DistNetworkError, gloo's: a process never came
        if not PEER_TIMEOUT.search(str(e)):
            raise
        raise PeerLost(f"the {world_size} processes did not all start within --ddp_timeout "
                       f"{timeout_s}s ({str(e).strip().splitlines()[-1][:200]})") from None


# -----------------------------------------------------------------------------
# Non-finite steps: a nan/inf loss or gradient norm never reaches the weights

def step_if_finite(optimizer, scaler, norm):
    """scaler.step(optimizer) and scaler.update(), but in bfloat16 and float32 no step at all
    where the gradient norm is nan or inf: AdamW would carry it into every weight and moment.
    The norm is of the summed gradients of every rank (DDP's all-reduced ones, FSDP's global
    norm), so every rank decides alike; a nan/inf loss makes its gradients nan too. The float16
    scaler already skips such steps (and lowers its scale). The .item() waits for the backward,
    as the scaler's own check does."""
    if scaler.is_enabled() or torch.isfinite(norm).item():
        scaler.step(optimizer)
    scaler.update()


class Diverged(Exception):
    """Training cannot go on (its steps keep coming out nan/inf): one line, exit status 1."""


class NonFiniteSteps:
    """After each step: a warning line for a step whose loss (the mean of every rank's) or
    gradient norm is nan/inf, and the stop after LIMIT such steps in a row. Under float16 the
    scaler skips the steps whose gradients overflow: normal while its scale settles, so those
    count only when the loss itself is not finite."""
    LIMIT = 5

    def __init__(self, cfg, scaler, log):
        self.cfg, self.scaler, self.log, self.in_a_row = cfg, scaler, log, 0

    def check(self, step, loss, norm):
        norm_bad = not math.isfinite(norm) and not self.scaler.is_enabled()
        if math.isfinite(loss) and not norm_bad:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.log(f"warning: step {step}: loss {loss}, gradient norm {norm}: "
                 + ("not finite, the weights were not updated" if norm_bad or self.scaler.is_enabled()
                    else "the loss is not finite"))
        if self.in_a_row >= self.LIMIT:
            good = list_checkpoints(self.cfg.log_dir)
            raise Diverged(f"stopped at step {step}: {self.in_a_row} steps in a row with a nan/inf loss or "
                           f"gradient norm; the newest checkpoint, all finite, is "
                           + (f"{good[-1][1]}: resume it with a lower --max_lr" if good else "none: none was written")
                           + " (or raise --warmup_steps, or lower --grad_clip)")


def all_finite(model):
    """Are this model's weights all finite, on every rank (under FSDP each checks its shard)?
    A collective where there are several processes."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = torch.stack([(~torch.isfinite(p)).sum() for p in local]).sum().float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    return bad.item() == 0


# -----------------------------------------------------------------------------
# Signals: SIGTERM (preemption, scancel) or Ctrl-C finish the step, checkpoint, exit 0

class StopRequest:

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.requested = True

    def vote(self, ddp, device):
        """Has any rank been asked to stop? (under DDP/FSDP a collective: every rank calls it)"""
        if not ddp:
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return flag.item() > 0

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# Checkpoints: plain types only (torch.load's safe default reads them), written atomically,
# with all that an exact resume needs

CHECKPOINT_NAME = re.compile(r"model_(\d+)\.pt")
SHORT_WRITE = re.compile(r"unexpected pos|failed writing|file write failed")  # torch.save's, on a full disk


def list_checkpoints(log_dir):
    """(step, path) of the complete checkpoints in log_dir, oldest first. The folder is listed,
    not globbed, so a name like runs/lr[3e-4] is taken literally; .tmp files are unfinished."""
    if not os.path.isdir(log_dir):
        return []
    found = [(CHECKPOINT_NAME.fullmatch(n), n) for n in os.listdir(log_dir)]
    return sorted((int(m.group(1)), os.path.join(log_dir, n)) for m, n in found if m)


def rng_state():
    """The RNG states of this process. Training draws no random numbers after the init (no
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


def full_state(model, optimizer):
    """The whole model and optimizer state on rank 0's CPU, in the format of a plain model's
    state_dict() and optimizer.state_dict(), however the model is wrapped or sharded (one
    checkpoint format for 1 process, DDP and FSDP). A collective: every rank calls it; the
    other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    ids = {}  # it names each parameter by its path: number them in param-group order, as torch.optim
    groups = [{**g, "params": [ids.setdefault(n, len(ids)) for n in g["params"]]}
              for g in optim.get("param_groups", [])]
    return model_state, {"state": {ids[n]: v for n, v in optim.get("state", {}).items()}, "param_groups": groups}


def load_full_state(model, optimizer, model_state, optim_state):
    """The inverse of full_state(), on every rank: each takes its shard under FSDP."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)  # the tied matrix: its first name, as full_state() writes it
    paths = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    optim_state = {"state": {paths[i]: v for i, v in optim_state["state"].items()},
                   "param_groups": [{**g, "params": [paths[i] for i in g["params"]]}
                                    for g in optim_state["param_groups"]]}
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, dict(model_state), options=options)  # a copy: it swaps in shards
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def save_checkpoint(cfg, step, raw_model, optimizer, scaler, train_loader, val_loss, world_size,
                    master_process, log):
    """model_{step:05d}.pt: the state before optimizer step `step`, gathered from every rank,
    written by rank 0. val_loss is that step's val loss, or None where it was not evaluated.
    Never with nan/inf weights: they would rotate good checkpoints out."""
    t0 = time.time()
    if not all_finite(raw_model):
        good = [p for s, p in list_checkpoints(cfg.log_dir) if s < step]
        raise Diverged(f"the weights before step {step} are not all finite: model_{step:05d}.pt not written; "
                       f"the newest checkpoint, all finite, is {good[-1] if good else 'none'}")
    model_state, optim_state = full_state(raw_model, optimizer)
    if not master_process:
        return
    path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
    checkpoint = {"model": model_state, "config": dataclasses.asdict(raw_model.config), "step": step,
                  "val_loss": val_loss, "optimizer": optim_state, "scaler": scaler.state_dict(),
                  "loader": train_loader.state_dict(), "train_config": dataclasses.asdict(cfg),
                  "world_size": world_size, "rng": rng_state()}
    try:
        fineweb.write_atomic(path, lambda f: torch.save(checkpoint, f))
    except (OSError, RuntimeError) as e:  # the temporary file is gone, the older ones intact
        # a full disk: an OSError of write() or fsync(), or from torch.save's zip writer a
        # RuntimeError ("unexpected pos 197696 vs 197588": a short write)
        if isinstance(e, RuntimeError) and not SHORT_WRITE.search(str(e)):
            raise
        import shutil
        older = [p for s, p in list_checkpoints(cfg.log_dir) if s < step]
        need = os.path.getsize(older[-1]) if older else 16 * sum(p.numel() for p in raw_model.parameters())
        free = shutil.disk_usage(cfg.log_dir).free
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else
                  "No space left on device" if free < need else "the write stopped short")
        raise UserError(f"cannot write {path} ({reason}; it needs about {fineweb.format_bytes(need)}, "
                        f"{fineweb.format_bytes(free)} are free); "
                        + (f"the previous checkpoint {older[-1]} is intact" if older
                           else "there is no earlier checkpoint")) from None
    if cfg.keep_checkpoints > 0:  # the newest N up to this one (not a later, abandoned run's)
        for _, old in [c for c in list_checkpoints(cfg.log_dir) if c[0] <= step][:-cfg.keep_checkpoints]:
            os.remove(old)
    log(f"saved {path} ({time.time() - t0:.1f}s)")


def load_checkpoint(path):
    """A checkpoint of this program, read with torch.load's safe default (weights_only)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        # mmap: the tensors are read from the file as they are used, not all at once on every
        # rank (gpt2-xl's checkpoint is 19 GB; 8 ranks on a node would hold 150 GB); the page
        # cache is shared, and a rank under FSDP reads its shard's pages
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated file, a pickle of other objects: never unpickled
        raise UserError(f"{path} is not a readable checkpoint of train_gpt2.py "
                        f"({type(e).__name__}: it is cut short or holds other objects)") from None
    if not isinstance(checkpoint, dict) or not {"model", "config", "step"} <= set(checkpoint):
        raise UserError(f"{path} is not a checkpoint of train_gpt2.py (no model, config and step)")
    return checkpoint


def check_weights(path, model, weights):
    """One line, not load_state_dict's traceback, when a checkpoint's tensors do not fit the model."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in weights.items() if torch.is_tensor(v)}
    wrong = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if wrong:
        raise UserError(f"{path}: its weights do not fit its config {dataclasses.asdict(model.config)} "
                        f"({len(wrong)} tensors differ; {wrong[0]}: {theirs.get(wrong[0], 'missing')} "
                        f"in the file, {ours.get(wrong[0], 'none')} in the model)")


def model_from_checkpoint(checkpoint, path):
    """The GPT that a checkpoint holds; old checkpoints carry flash_attention, now gone."""
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in checkpoint["config"].items() if k in names}))
    check_weights(path, model, checkpoint["model"])
    model.load_state_dict(checkpoint["model"])
    return model


def load_model(checkpoint=None, model_type=None, device="cpu"):
    """For the tools: one of our checkpoints, or OpenAI's weights ('gpt2', ...) through
    Hugging Face; in eval mode, on the device."""
    if checkpoint is not None:
        model = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
    else:
        if os.path.isdir(model_type):  # a damaged folder is our one line, not transformers' report
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
        try:
            model = GPT.from_pretrained(model_type)
        except Exception as e:
            if os.path.isdir(model_type):  # a saved folder: its files are damaged
                raise UserError(f"{model_type} is not a readable GPT-2 folder: its config.json or "
                                f"model.safetensors is damaged ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:200]})") from None
            if not isinstance(e, OSError):
                raise
            # offline, and the weights are not in Hugging Face's cache
            raise UserError(f"cannot load {model_type} from Hugging Face ({str(e).splitlines()[0]}); "
                            "no network? set HF_ENDPOINT to a mirror of the hub") from None
    return model.to(device).eval()


class RunFinished(Exception):
    """--resume of a run that is done: main() says so and exits with status 0."""


def find_checkpoint(cfg, log):
    """(path, checkpoint) to resume from, or (None, None) for a fresh start."""
    if cfg.resume != "auto":
        return cfg.resume, load_checkpoint(cfg.resume)
    unreadable = []
    for _, path in reversed(list_checkpoints(cfg.log_dir)):  # the newest first
        try:
            return path, load_checkpoint(path)
        except UserError as e:  # e.g. a file cut short by a full disk
            log(f"warning: {e}; trying the previous checkpoint")
            unreadable.append(os.path.basename(path))
    if unreadable:  # never start afresh over a run whose checkpoints are all damaged
        raise UserError(f"--resume auto: no readable checkpoint in {cfg.log_dir} "
                        f"({', '.join(unreadable)} unreadable); log.txt is untouched")
    log(f"--resume auto: no checkpoint in {cfg.log_dir}, starting fresh")
    return None, None


def maybe_resume(cfg, raw_model, optimizer, scaler, train_loader, log):
    """With --resume: loads everything an exact continuation needs and returns its step; else 0."""
    if not cfg.resume:
        return 0
    t0 = time.time()
    path, checkpoint = find_checkpoint(cfg, log)
    if checkpoint is None:
        return 0
    if not {"optimizer", "loader", "train_config", "rng"} <= set(checkpoint):
        raise UserError(f"{path} holds weights only (no optimizer, loader or RNG state): cannot resume")
    wrong = [f"{k} {v} (flags: {getattr(raw_model.config, k)})" for k, v in checkpoint["config"].items()
             if hasattr(raw_model.config, k) and getattr(raw_model.config, k) != v]
    if wrong:
        raise UserError(f"{path} is a different model: {', '.join(wrong)}")
    old = checkpoint["train_config"]
    if (old["micro_batch_size"], old["sequence_length"]) != (cfg.micro_batch_size, cfg.sequence_length):
        raise UserError(f"{path} was written with --micro_batch_size {old['micro_batch_size']} "
                        f"--sequence_length {old['sequence_length']}: resume needs the same "
                        "(the loader position counts batches of B*T tokens)")
    step = checkpoint["step"]
    if step == cfg.max_steps:
        raise RunFinished(f"{path} is the last checkpoint of a finished run (step {step} of "
                          f"--max_steps {cfg.max_steps}): nothing to do; raise --max_steps to train on")
    if step > cfg.max_steps:
        raise UserError(f"{path} is at step {step}, past --max_steps {cfg.max_steps}: raise "
                        "--max_steps to train on, or resume an earlier checkpoint")
    effects = dict(max_steps=f"the cosine schedule now ends at step {cfg.max_steps}",
                   warmup_steps="the schedule's warmup changes", max_lr="the schedule jumps",
                   min_lr="the schedule jumps", shuffle="the data order changes from here on",
                   seed="the shuffled data order changes from here on")
    changed = [f"--{k} {old[k]} -> {getattr(cfg, k)} ({effect})" for k, effect in effects.items()
               if k in old and old[k] != getattr(cfg, k) and (k != "seed" or cfg.shuffle)]
    if changed:
        log(f"warning: resuming with other flags than the run's: {'; '.join(changed)}")
    check_weights(path, raw_model, checkpoint["model"])
    for saved, group in zip(checkpoint["optimizer"]["param_groups"], optimizer.param_groups):
        saved["fused"] = group["fused"]  # fused or not is this machine's choice (CUDA or not)
    load_full_state(raw_model, optimizer, checkpoint["model"], checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint.get("scaler") or scaler.state_dict())
    train_loader.set_state(checkpoint["loader"])
    set_rng_state(checkpoint["rng"])
    log(f"resumed from {path} at step {step} (loaded in {time.time() - t0:.1f}s)")
    if checkpoint["world_size"] != int(os.environ.get("WORLD_SIZE", 1)):
        log(f"the checkpoint was written by {checkpoint['world_size']} processes, this run has "
            f"{os.environ.get('WORLD_SIZE', 1)}: the loader position is the same stream's")
    return step


# -----------------------------------------------------------------------------
# The log folder: what a fresh start may overwrite, and the log after a resume

OUR_FILES = re.compile(r"(model_\d+\.pt|log\.txt|config\.json|wandb_run\.json)(\.tmp)?")
LOCK = "train_gpt2.lock"  # in --log_dir while a run uses it (fineweb.lock_folder)


def check_log_dir(cfg):
    """Before anything is built: a folder rank 0 can write to, and never a fresh start over
    another run's checkpoints."""
    if os.path.exists(cfg.log_dir) and not os.path.isdir(cfg.log_dir):
        raise UserError(f"--log_dir {cfg.log_dir} is a file, not a folder")
    if int(os.environ.get("RANK", 0)) == 0:
        try:
            os.makedirs(cfg.log_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=cfg.log_dir):  # permissions, a read-only disk
                pass
        except OSError as e:
            raise UserError(f"cannot write to --log_dir {cfg.log_dir} ({e.strerror or e})") from None
        # one run per folder, before anything in it is read or deleted: rank 0, the only writer
        # (one lock for all nodes, on a shared filesystem), holds it until main() returns
        try:
            fineweb.lock_folder(cfg.log_dir, LOCK, "another run of train_gpt2.py writes its log and "
                                "checkpoints there (a forgotten window?); stop it, or choose another --log_dir")
        except fineweb.FolderInUse as e:
            raise UserError(e) from None
    if cfg.resume or not list_checkpoints(cfg.log_dir):
        return
    if not cfg.overwrite:
        raise UserError(f"{cfg.log_dir} holds the checkpoints of another run: continue it with "
                        "--resume auto, or choose another --log_dir, or pass --overwrite 1 to delete them")
    if int(os.environ.get("RANK", 0)) == 0:
        for name in os.listdir(cfg.log_dir):  # only what this program writes there
            if OUR_FILES.fullmatch(name):
                os.remove(os.path.join(cfg.log_dir, name))


def prepare_log_dir(cfg, start_step):
    """config.json (this start's flags), and log.txt: emptied by a fresh start (as the lecture),
    cut back to the resumed step otherwise (a killed run may have logged past it). Stale .tmp
    files of killed writes are removed. Every rewrite is atomic. Returns the last step whose
    train loss the old log.txt held (-1: none): how far the stopped run got."""
    os.makedirs(cfg.log_dir, exist_ok=True)
    for name in os.listdir(cfg.log_dir):
        if name.endswith(".tmp") and OUR_FILES.fullmatch(name):
            os.remove(os.path.join(cfg.log_dir, name))
    try:
        fineweb.write_atomic(os.path.join(cfg.log_dir, "config.json"),
                             lambda f: f.write(json.dumps(dataclasses.asdict(cfg), indent=1).encode()))
    except OSError as e:  # e.g. a folder in its place
        raise UserError(f"cannot write {e.filename} ({e.strerror or e})") from None
    log_file = os.path.join(cfg.log_dir, "log.txt")
    old = []
    if start_step > 0 and os.path.exists(log_file):
        try:  # whole lines only; a damaged byte spoils its line alone
            with open(log_file, encoding="utf-8", errors="replace") as f:
                old = [l for l in f if l.endswith("\n") and l.split(" ", 1)[0].isdigit()]
        except OSError as e:
            raise UserError(f"cannot read {log_file} ({e.strerror or e})") from None
    lines = [l for l in old if int(l.split(" ", 1)[0]) < start_step]  # the steps before start_step
    fineweb.write_atomic(log_file, lambda f: f.write("".join(lines).encode()))
    return max([int(l.split()[0]) for l in old if l.split()[1:2] == ["train"]], default=-1)


# -----------------------------------------------------------------------------
# The run's log: log.txt, and where asked Weights & Biases and TensorBoard; the time left

WANDB_RUN = "wandb_run.json"  # the id of the log folder's wandb run, which --resume continues


def require_packages(cfg):
    """--wandb and --tensorboard need packages that requirements.txt leaves out: rank 0 (the
    only process that logs) imports them at the start, or says in one line how to get them."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    for on, flag, package, module in [(cfg.wandb, "--wandb", "wandb", "wandb"),
                                      (cfg.tensorboard, "--tensorboard 1", "tensorboard", "torch.utils.tensorboard")]:
        if on:
            try:
                __import__(module)
            except ImportError as e:
                raise UserError(f"{flag} needs the {package} package ({e}): pip install {package}") from None


def format_duration(seconds):
    """1h52m, 4m07s, 37s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def code_block(text):
    """Text that TensorBoard's Markdown shows as it is."""
    return "    " + text.replace("\n", "\n    ")


class RunLog:
    """What rank 0 logs, one method per event of the loop (on the other ranks it writes
    nothing). log.txt gets the lecture's line of each event at once. --tensorboard 1: every
    value goes to <log_dir>/tb at once, flushed at the end of each step, so that a killed run
    keeps all it logged. --wandb: one row per step, the step's evaluations and its training
    values together, sent at the end of the step; a step stopped during its evaluation is thus
    sent once, by the run that finishes it.

    train() returns the time left: the mean of the last 50 step times (the evaluations are not
    in them, nor the first step of a start, which compiles) times the steps left, plus the time
    of the latest evaluation times the evaluations left."""

    def __init__(self, cfg, log_file, start_step, master_process):
        self.cfg, self.log_file, self.on, self.start_step = cfg, log_file, master_process, start_step
        self.step_times, self.eval_time, self.last_eval_time = [], 0.0, 0.0
        self.row, self.wandb, self.wandb_from, self.tb = {}, None, start_step, None
        if not master_process:
            return
        stopped_at = prepare_log_dir(cfg, start_step)
        if cfg.wandb:
            self._start_wandb(stopped_at)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides what an earlier run of this folder logged from the
            # resumed step on (everything, at a fresh start), as log.txt is cut back
            self.tb = SummaryWriter(os.path.join(cfg.log_dir, "tb"), purge_step=start_step)
            self.tb.add_text("config", code_block(json.dumps(dataclasses.asdict(cfg), indent=1)), start_step)
            self.tb.flush()

    def _start_wandb(self, stopped_at):
        """The log folder's wandb run: a new one at a fresh start; when resumed, the same one,
        its id kept in wandb_run.json (beside the run's other files, rather than in the
        checkpoints: one id for every checkpoint of the run, and none for --init_from to carry
        into another run). A wandb run takes each step once and in increasing order, so a
        resumed run does not send the steps that the stopped one may have sent after its
        checkpoint (it recomputes the same values): it starts after the last of them."""
        import wandb
        cfg, path = self.cfg, os.path.join(self.cfg.log_dir, WANDB_RUN)
        saved = {}
        if self.start_step > 0 and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
        if saved.get("project") != cfg.wandb:  # another project: another run
            saved = {}
        # the last step that any earlier process of this wandb run may have sent
        sent = max(stopped_at, saved.get("sent_through", -1)) if saved else -1
        try:
            self.wandb = wandb.init(project=cfg.wandb, dir=cfg.log_dir, config=dataclasses.asdict(cfg),
                                    name=cfg.wandb_run_name or os.path.basename(os.path.abspath(cfg.log_dir)),
                                    id=saved.get("id"), resume="allow" if saved else None)
        except wandb.errors.Error as e:
            raise UserError(f"--wandb {cfg.wandb}: {str(e).splitlines()[0].rstrip('.')}; or set "
                            "WANDB_MODE=offline, and upload the run later with `wandb sync`") from None
        state = dict(id=self.wandb.id, project=cfg.wandb, sent_through=sent)
        fineweb.write_atomic(path, lambda f: f.write(json.dumps(state).encode()))
        if sent >= self.start_step:
            self.wandb_from = sent + 1
            print(f"wandb: run {self.wandb.id} may already hold steps {self.start_step}-{sent}, sent by the "
                  f"stopped run after its checkpoint; wandb takes a run's steps in increasing order only, so "
                  f"this run sends from step {sent + 1} on (it recomputes the same values for those steps)")

    def _write(self, line):
        if self.on:
            with open(self.log_file, "a") as f:
                f.write(line + "\n")

    def _add(self, step, values):
        if self.tb:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
        self.row.update(values)

    def val(self, step, loss, seconds):
        self._write(f"{step} val {loss:.4f}")
        self._add(step, {"val/loss": loss})
        self.eval_time += seconds

    def hella(self, step, acc_norm, seconds):
        self._write(f"{step} hella {acc_norm:.4f}")
        self._add(step, {"hellaswag/acc_norm": acc_norm})
        self.eval_time += seconds

    def samples(self, step, texts, seconds):
        if self.tb:
            self.tb.add_text("samples", "\n\n".join(code_block(t) for t in texts), step)
        if self.wandb:
            import wandb
            self.row["samples"] = wandb.Table(columns=["step", "sample"], data=[[step, t] for t in texts])
        self.eval_time += seconds

    def train(self, step, loss, lr, norm, dt, tokens_per_sec, mfu):
        """Logs the step and returns the time left, e.g. 1h52m."""
        self._write(f"{step} train {loss:.6f}")
        values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": norm,
                  "train/tokens_per_sec": tokens_per_sec}
        self._add(step, values if mfu is None else {**values, "train/mfu": mfu})
        if self.wandb and step >= self.wandb_from:
            self.wandb.log(self.row, step=step, commit=True)
        if self.tb:
            self.tb.flush()
        self.row = {}
        return self._time_left(step, dt)

    def _time_left(self, step, dt):
        if self.eval_time:  # this step evaluated
            self.last_eval_time, self.eval_time = self.eval_time, 0.0
        if step > self.start_step:
            self.step_times = self.step_times[-49:] + [dt]
        last, k = self.cfg.max_steps - 1, self.cfg.eval_interval
        if step == last:
            return "0s"
        if not self.step_times:
            return "-"
        evals_left = last // k - step // k + (last % k != 0)  # steps s > step: s % k == 0, and the last
        steps_left = last - step
        return format_duration(sum(self.step_times) / len(self.step_times) * steps_left
                               + self.last_eval_time * evals_left)

    def close(self):
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()


# -----------------------------------------------------------------------------
# The command line: every TrainConfig field is a flag; every value is checked before
# anything is built

ENV_HELP = """environment variables:
  HELLASWAG_DIR        a folder with your own hellaswag_val.jsonl (default: the copy in assets/)
  RANK, LOCAL_RANK, WORLD_SIZE   set by torchrun: a multi-process run"""


def parse_args(argv=None):
    parser = fineweb.OneLineParser(description="Train GPT-2 on FineWeb-Edu shards; the defaults are "
                           "the lecture's 124M run.", epilog=ENV_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        low, choices = f.metadata["low"], f.metadata["choices"]
        kind = (fineweb.number(f.type, low) if low is not None else fineweb.one_of(*choices) if choices
                else fineweb.str2bool if f.type is bool else f.type)
        default = int(f.default) if kind is fineweb.str2bool else "none" if f.default == "" else f.default
        by_model = {k for p in [*PRESETS.values(), PRETRAINED["gpt2"]] for k in p}
        preset = "".join(f" or {name}'s" for name, keys in (("--model", by_model), ("--demo", DEMO))
                         if f.name in keys)
        parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                            **(dict(nargs="?", const=True) if kind is fineweb.str2bool else {}),  # --demo: 1
                            metavar="0|1" if kind is fineweb.str2bool else f.name.upper(),
                            help=f"{f.metadata['help']} (default: {default}{preset})".replace("%", "%%"))
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    # --model's shape and training defaults, then --demo's, under the flags given (--init_from
    # gpt2-xl: its shape)
    init_from = given.get("init_from", "")
    model = given.get("model", init_from if init_from in PRESETS else "gpt2")
    demo = DEMO if given.get("demo") else {}
    cfg = TrainConfig(**{**PRETRAINED[model], **PRESETS[model], **demo, "model": model, **given})
    check_config(cfg)
    return cfg


def check_config(cfg):
    """What one flag's range cannot say, before any data, model or process group exists."""
    B, T, world_size = cfg.micro_batch_size, cfg.sequence_length, int(os.environ.get("WORLD_SIZE", 1))
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd {cfg.n_embd} is not a multiple of --n_head {cfg.n_head}")
    if T > cfg.block_size:
        raise UserError(f"--sequence_length {T} is longer than --block_size {cfg.block_size}")
    if cfg.total_batch_size % (B * T * world_size):
        raise UserError(f"--total_batch_size {cfg.total_batch_size} is not divisible by "
                        f"B*T*world_size = {B}*{T}*{world_size} = {B * T * world_size}")
    if cfg.max_lr <= 0 or cfg.min_lr > cfg.max_lr:
        raise UserError(f"--max_lr must be above 0 and at least --min_lr, not {cfg.max_lr} "
                        f"(--min_lr {cfg.min_lr})")
    if cfg.sample and cfg.block_size < 32:
        raise UserError(f"sampling writes 32 tokens, more than --block_size {cfg.block_size}: "
                        "raise it, or pass --sample 0")
    if cfg.vocab_size < 50257 and (cfg.sample or cfg.hellaswag):
        raise UserError(f"--vocab_size {cfg.vocab_size} is smaller than the GPT-2 tokenizer's 50257, "
                        "which sampling and HellaSwag use: raise it, or pass --sample 0 --hellaswag 0")
    if world_size > 1 and cfg.device.startswith("cuda:"):  # every rank would take that one GPU
        raise UserError(f"--device {cfg.device} under torchrun: each process takes the GPU of its "
                        "LOCAL_RANK; pass --device cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES")
    pick_compile(cfg.compile, pick_device(cfg.device).split(":")[0])  # no Triton: fail now, not at step 0
    if cfg.init_from and cfg.resume:
        raise UserError("--init_from starts a new run from a model's weights; --resume continues a "
                        "run: pass one of them")
    if cfg.fsdp and "RANK" not in os.environ:  # (torchrun with 1 process: FSDP on 1 GPU, as the tests run it)
        raise UserError("--fsdp 1 shards the model over the processes of torchrun: launch with "
                        "torchrun --nproc_per_node=N, or leave it off")
    if not cfg.log_dir or not cfg.data_root:
        raise UserError("--log_dir and --data_root must not be empty")
    require_packages(cfg)


# -----------------------------------------------------------------------------
# MFU: model FLOPs utilization, the FLOPs the model needs per second over the chip's peak

# dense tensor-core peak TFLOPS per autocast dtype (vendor datasheets, without sparsity);
# float32 means TF32 matmuls. None: the chip lacks the dtype. First match wins.
PEAK_TFLOPS = [  # name in torch.cuda.get_device_name: bfloat16, float16, float32 (TF32)
    ("H100 PCIe", (756, 756, 378)), ("H100", (989, 989, 494)), ("GH200", (989, 989, 494)),
    ("H200", (989, 989, 494)), ("B200", (2250, 2250, 1100)), ("A100", (312, 312, 156)),
    ("L40S", (362, 362, 183)), ("L40", (181, 181, 90)), ("L4", (121, 121, 60)),
    ("RTX 4090", (165, 165, 83)), ("RTX 3090", (71, 71, 36)),
    ("V100", (None, 125, None)), ("T4", (None, 65, None)),
]


def peak_tflops(device, dtype):
    """The peak of this GPU for this dtype, or None when unknown (or not a GPU)."""
    if not device.startswith("cuda"):
        return None
    column = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[dtype]
    for name, peaks in PEAK_TFLOPS:
        if name in device_name(device):
            return peaks[column]
    return None


def flops_per_token(model, T):
    """Training FLOPs per token: 6N for the matmuls with the weights (forward 2N, backward 4N)
    plus attention's 12 * n_layer * n_head * head_size * T (PaLM paper, appendix B)."""
    n_params = sum(p.numel() for p in model.parameters())
    return 6 * n_params + 12 * model.config.n_layer * model.config.n_embd * T


def mfu(tokens_per_sec, flops_per_token, peak):
    """MFU, a fraction, of one chip: tokens_per_sec must be that chip's own."""
    return tokens_per_sec * flops_per_token / (peak * 1e12)


def report_start(cfg, device, dtype, dtype_why, use_compile, compile_why, raw_model, optimizer,
                 train_loader, val_loader, world_size, log):
    """Prints what the flags came to; returns the peak TFLOPS for MFU (None: unknown)."""
    c = raw_model.config
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"model {cfg.model}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} channels, vocab "
        f"{c.vocab_size}, context {c.block_size}: {n_params:,} parameters"
        + (f", from {cfg.init_from}" if cfg.init_from else ""))
    groups = [(len(g["params"]), sum(p.numel() for p in g["params"])) for g in optimizer.param_groups]
    log(f"AdamW: weight decay {cfg.weight_decay} on {groups[0][0]} tensors ({groups[0][1]:,} "
        f"parameters), none on {groups[1][0]} ({groups[1][1]:,}); learning rate: warmup to "
        f"{cfg.max_lr:g} over {cfg.warmup_steps} steps, cosine to {cfg.min_lr:g} at step {cfg.max_steps}")
    log(f"device {device_name(device)}, dtype {str(dtype)[6:]} ({dtype_why}), compile "
        f"{'on' if use_compile else 'off'} ({compile_why}), "
        + ("FSDP" if cfg.fsdp else "DDP" if world_size > 1 else "1 process")
        + (", activation checkpointing" if cfg.activation_checkpointing else ""))
    log(f"data: {len(train_loader.shards)} train and {len(val_loader.shards)} val shards in {cfg.data_root}")
    weights, grads, adam, activations, peak_bytes = estimate_memory(cfg, n_params, dtype, world_size)
    log(f"memory per process (estimate, eager): {peak_bytes / 2**30:.2f} GiB at the peak; weights "
        f"{weights / 2**30:.2f}, gradients {grads / 2**30:.2f}, AdamW {adam / 2**30:.2f}, activations "
        f"{activations / 2**30:.2f} GiB")
    if device.startswith("cuda") and peak_bytes > torch.cuda.get_device_properties(device).total_memory:
        log(f"warning: that is more than this GPU's {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} "
            f"GiB: try --micro_batch_size {max(1, cfg.micro_batch_size // 2)}, --activation_checkpointing 1"
            + (", or --fsdp 1" if world_size > 1 and not cfg.fsdp else ""))
    peak = cfg.peak_tflops or peak_tflops(device, dtype)
    if device.startswith("cuda") and not peak:
        log(f"MFU not shown: no peak TFLOPS known for {device_name(device)} in {str(dtype)[6:]} "
            "(pass --peak_tflops)")
    return peak


# -----------------------------------------------------------------------------
# main: one line per error, the process group torn down whatever happens

# how gloo and NCCL report that a peer process went away
PEER_LOST = re.compile(r"closed by peer|reset by peer|remote worker|remote process|Broken pipe|"
                       r"NCCL communicator was aborted|Failed to recv")
# ... and that it did not answer within the process group's timeout (--ddp_timeout)
PEER_TIMEOUT = re.compile(r"[Tt]imed out|[Tt]imeout")


class PeerLost(UserError):
    """Another process of the run died or hangs: every process that waited on it says so."""


def main(argv=None):
    stop = StopRequest()  # first of all: a SIGTERM during the start must not kill silently
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cfg = None
    try:
        cfg = parse_args(argv)
        check_log_dir(cfg)
        if cfg.demo:
            write_demo_shards(cfg)
        train(cfg, stop)
        if cfg.demo and rank == 0:  # the demo's last stage: the curves, as plot_log.py draws them
            import plot_log
            plot_log.main([os.path.join(cfg.log_dir, "log.txt")])
    except Diverged as e:  # every rank decided alike: rank 0 says it
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except (UserError, fineweb.AssetError) as e:
        # before the process group, every process fails alike: one line per node; after it, an
        # error may be one process's own (its node's data, its GPU): each says it
        if isinstance(e, PeerLost) or dist.is_initialized() and dist.get_world_size() > 1:
            print(f"error: rank {rank}: {e}", file=sys.stderr)
        elif local_rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a collective failed because another process died or hangs
        if dist.is_initialized() and PEER_TIMEOUT.search(str(e)):  # each waiting process says it
            print(f"error: rank {rank}: no answer from another process of this run within "
                  f"--ddp_timeout {cfg.ddp_timeout}s: it died or hangs (a stopped job, a dead node, "
                  "a save slower than that: raise --ddp_timeout)", file=sys.stderr)
            return 1
        if not (dist.is_initialized() and PEER_LOST.search(str(e))):
            raise
        if local_rank == 0:
            print(f"error: rank {rank}: stopped, as another process of this run failed (its error "
                  f"is above, or on its node)", file=sys.stderr)
        return 1
    except IndexError as e:  # the embedding's lookup: the data holds a token id >= vocab_size
        if "index out of range" not in str(e):
            raise
        print(f"error: the data holds token ids >= --vocab_size {cfg.vocab_size}: the shards were "
              "written with another tokenizer, or --vocab_size is too small", file=sys.stderr)
        return 1
    except NotImplementedError as e:  # an operation MPS lacks: say which, not the traceback
        if "MPS" not in str(e):
            raise
        print(f"error: {str(e).splitlines()[0]} Set PYTORCH_ENABLE_MPS_FALLBACK=1 to run it on the "
              "CPU, or pass --device cpu", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk while writing log.txt or config.json
        import errno
        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        print(f"error: cannot write {e.filename or 'to ' + cfg.log_dir} ({e.strerror}); the "
              "checkpoints written before are intact: make room and continue with --resume auto",
              file=sys.stderr)
        return 1
    except RunFinished as e:
        if rank == 0:
            print(e)
    except KeyboardInterrupt:
        print("error: stopped at once by a second Ctrl-C; no checkpoint was written for the "
              "current step", file=sys.stderr)
        return 130
    finally:
        stop.restore()
        if rank == 0 and cfg is not None:
            fineweb.release_folder(cfg.log_dir, LOCK)
        if dist.is_initialized():
            # DDP sits in a reference cycle: free it while the process group lives (left to
            # the interpreter's exit, gloo sometimes aborts with "terminate called ...")
            gc.collect()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
