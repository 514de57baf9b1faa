"""
Sample text from one of our checkpoints, or from OpenAI's GPT-2 through Hugging Face.

    python sample.py --checkpoint log/model_19072.pt
    python sample.py -m gpt2 --prompt "The meaning of life is" --max_new_tokens 64
    python sample.py --checkpoint log/model_19072.pt --num_samples 1 --temperature 0.8

By default this is the training loop's sampling, number for number: 4 samples of the prompt
"Hello, I'm a language model," (8 tokens) + 24 new tokens = 32 tokens, top-k 50, a generator
on the device seeded 42 (42 + rank, rank 0), bf16 autocast on CUDA, through the same function,
train_gpt2.generate. Only the KV cache is new (--no_kv_cache: off): it gives the same tokens in
float32; under bf16 its different matmul shapes round differently, so a sample may diverge.
"""
import argparse
import sys

import torch

import train_gpt2
from train_gpt2 import UserError


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
    if num_samples < 1 or max_new_tokens < 1 or not temperature > 0:
        raise UserError("--num_samples, --max_new_tokens and --temperature must be positive")
    idx = torch.tensor(tokens, dtype=torch.long, device=device).repeat(num_samples, 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # the trained run pads the vocabulary to 50304: the 47 extra ids have no text
    return train_gpt2.generate(model, idx, total, top_k=top_k, temperature=temperature,
                               generator=generator, use_kv_cache=use_kv_cache, dtype=dtype,
                               vocab_limit=enc.n_vocab)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Sample from a checkpoint or from GPT-2")
    parser.add_argument("--checkpoint", help="one of our checkpoints, e.g. log/model_19072.pt")
    parser.add_argument("-m", "--model_type", choices=list(train_gpt2.PRETRAINED),
                        help="OpenAI's weights, loaded into our GPT through Hugging Face")
    parser.add_argument("--prompt", default="Hello, I'm a language model,",
                        help="text to continue (empty: start from <|endoftext|>)")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=24,
                        help="tokens to add; with the default prompt (8 tokens) 24 makes "
                             "training's 32 (default: 24)")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest (50)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42, help="training uses 42 + rank (42)")
    parser.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="autocast dtype; default bfloat16 on cuda (as training), else float32")
    parser.add_argument("--no_kv_cache", action="store_true",
                        help="rerun the whole sequence for every token, as training does (slower)")
    args = parser.parse_args(argv)
    try:
        if (args.model_type is None) == (args.checkpoint is None):
            raise UserError("give exactly one of --checkpoint and -m/--model_type")
        device = args.device or train_gpt2.auto_device()
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        enc = train_gpt2.gpt2_tokenizer()  # before the model: a missing tokenizer fails fast
        model = train_gpt2.load_model(args.checkpoint, args.model_type, device)
        out = sample(model, enc, args.prompt, args.num_samples, args.max_new_tokens, args.top_k,
                     args.temperature, args.seed, getattr(torch, dtype), not args.no_kv_cache)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for i, row in enumerate(out.tolist()):
        print(f"sample {i}: {enc.decode(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
