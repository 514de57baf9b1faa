"""
Sample text from one of our checkpoints, or from OpenAI's GPT-2 through Hugging Face.

    python sample.py --checkpoint log/model_19073.pt
    python sample.py -m gpt2 --prompt "The meaning of life is" --max_new_tokens 64
    python sample.py --checkpoint log/model_19073.pt --num_samples 1 --temperature 0.8

By default this is the training loop's sampling, number for number: 4 samples of the prompt
"Hello, I'm a language model," (8 tokens) + 24 new tokens = 32 tokens, top-k 50, a generator
on the device seeded 42 (the training loop's 42 + rank, rank 0), in the dtype training picks
(bf16 on Ampere or newer, float16 on older GPUs, float32 off CUDA).
What is new is a KV cache (--no_kv_cache: off): each new token runs through the model alone,
attending to the keys and values cached for the tokens before it. In float32 it gives the
training loop's tokens; under bf16 its other matmul shapes round differently, so a sample may
diverge after a while.
"""
import argparse
import sys

import torch
from torch.nn import functional as F

import fineweb
import train_gpt2
from train_gpt2 import UserError


# -----------------------------------------------------------------------------
# The KV cache: the model's own modules, run one new token at a time

def attend(attn, x, cache):
    """train_gpt2.CausalSelfAttention.forward with a cache of the keys and values of the
    tokens before x: x (B, T, C) are the new tokens; returns (B, T, C)."""
    B, T, C = x.size()
    q, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
    if "k" in cache:  # (B, nh, T_past + T, hs)
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
    cache["k"], cache["v"] = k, v
    # the prompt attends causally; a single new token may look at every position before it
    y = F.scaled_dot_product_attention(q, k, v, is_causal=k.size(2) == T)
    return attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def forward_cached(model, idx, caches):
    """The logits (B, T, V) of the new tokens idx (B, T), which follow the cached ones."""
    past = caches[0]["k"].size(2) if caches[0] else 0
    pos = torch.arange(past, past + idx.size(1), device=idx.device)  # positions past the cache
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)
    for block, cache in zip(model.transformer.h, caches):
        x = x + attend(block.attn, block.ln_1(x), cache)
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))


@torch.no_grad()
def generate(model, idx, max_length, top_k=50, temperature=1.0, generator=None,
             use_kv_cache=True, dtype=torch.float32, vocab_limit=None):
    """Extend idx (B, T0) to (B, max_length) tokens, as the training loop samples: softmax,
    keep the top_k, sample. Without a cache every step reruns the whole sequence so far.
    vocab_limit: sample only ids below it (the tokenizer's 50257, when the vocabulary is
    padded to 50304: the padding ids have no text and would crash decode)."""
    caches = [dict() for _ in model.transformer.h]
    amp = dict(device_type=idx.device.type, dtype=dtype, enabled=dtype != torch.float32)
    while idx.size(1) < max_length:
        with torch.autocast(**amp):
            if use_kv_cache:  # the whole prompt first, then only the newest token
                logits = forward_cached(model, idx if not caches[0] else idx[:, -1:], caches)
            else:
                logits, _ = model(idx)
        logits = logits[:, -1, :vocab_limit]  # (B, V): the prediction for the next position
        probs = F.softmax(logits.float() / temperature, dim=-1)
        # top-k sampling (Hugging Face's default of 50): never pick a very unlikely token
        topk_probs, topk_indices = torch.topk(probs, top_k, dim=-1)  # (B, top_k)
        ix = torch.multinomial(topk_probs, 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, torch.gather(topk_indices, -1, ix)], dim=1)
    return idx


def sample(model, enc, prompt, num_samples=4, max_new_tokens=24, top_k=50, temperature=1.0,
           seed=42, dtype=torch.float32, use_kv_cache=True):
    """(B, T0 + max_new_tokens) token ids: num_samples continuations of prompt."""
    device = next(model.parameters()).device
    # an empty prompt starts from <|endoftext|>, the token in front of every document
    tokens = enc.encode(prompt) if prompt else [enc.eot_token]
    total = len(tokens) + max_new_tokens
    if total > model.config.block_size:
        raise UserError(f"prompt ({len(tokens)} tokens) + --max_new_tokens {max_new_tokens} = "
                        f"{total} tokens is longer than the model's context "
                        f"(block_size {model.config.block_size})")
    vocab = min(model.config.vocab_size, enc.n_vocab)
    if not 1 <= top_k <= vocab:
        raise UserError(f"--top_k must be between 1 and {vocab}, got {top_k}")
    idx = torch.tensor(tokens, dtype=torch.long, device=device).repeat(num_samples, 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # the trained run pads the vocabulary to 50304: the 47 extra ids have no text
    return generate(model, idx, total, top_k=top_k, temperature=temperature, generator=generator,
                    use_kv_cache=use_kv_cache, dtype=dtype, vocab_limit=enc.n_vocab)


def main(argv=None):
    parser = fineweb.OneLineParser(
        description="Sample from one of our checkpoints or from GPT-2",
        epilog="environment variables:\n  HF_HOME              Hugging Face's cache, for -m's weights\n"
               "  HF_ENDPOINT          a Hugging Face mirror for -m's weights (e.g. https://hf-mirror.com)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    number = fineweb.number
    parser.add_argument("--checkpoint", help="one of our checkpoints, e.g. log/model_19073.pt (default: none)")
    parser.add_argument("-m", "--model_type", choices=list(train_gpt2.PRETRAINED),
                        help="OpenAI's weights, loaded into our GPT through Hugging Face (default: none)")
    parser.add_argument("--prompt", default="Hello, I'm a language model,",
                        help="text to continue; empty: start from <|endoftext|> (default: %(default)r)")
    parser.add_argument("--num_samples", type=number(int, 1), default=4, help="(default: 4)")
    parser.add_argument("--max_new_tokens", type=number(int, 1), default=24,
                        help="tokens to add; with the default prompt (8 tokens) 24 makes "
                             "training's 32 (default: 24)")
    parser.add_argument("--top_k", type=number(int, 1), default=50,
                        help="sample among the k likeliest tokens (default: 50)")
    parser.add_argument("--temperature", type=number(float, 1e-6), default=1.0,
                        help="below 1: more likely tokens; above 1: more diverse (default: 1.0)")
    parser.add_argument("--seed", type=number(int, 0), default=42,
                        help="the training loop uses 42 + rank (default: 42)")
    parser.add_argument("--device", default="auto", help="cuda, mps or cpu (default: auto, the first there is)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="autocast dtype (default: auto, training's: bfloat16 on GPUs that have it, "
                             "float16 on older ones, float32 off CUDA)")
    parser.add_argument("--no_kv_cache", action="store_true",
                        help="rerun the whole sequence for every token, as training does (default: off)")
    args = parser.parse_args(argv)
    try:
        if (args.model_type is None) == (args.checkpoint is None):
            raise UserError("give exactly one of --checkpoint and -m/--model_type")
        device = train_gpt2.pick_device(args.device)
        dtype, _ = train_gpt2.pick_dtype(args.dtype, device)  # training's choice
        enc = fineweb.gpt2_encoding()  # before the model: a damaged tokenizer file fails fast
        model = train_gpt2.load_model(args.checkpoint, args.model_type, device)
        out = sample(model, enc, args.prompt, args.num_samples, args.max_new_tokens, args.top_k,
                     args.temperature, args.seed, dtype, not args.no_kv_cache)
    except (UserError, fineweb.AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for i, row in enumerate(out.tolist()):
        print(f"sample {i}: {enc.decode(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
