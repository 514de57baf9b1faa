"""
Export one of our checkpoints as a Hugging Face `transformers` GPT-2 folder.

    python export_hf.py --checkpoint log/model_19073.pt --out gpt2-124M-fineweb-edu

    # then, anywhere transformers is installed:
    from transformers import GPT2LMHeadModel, AutoTokenizer
    model = GPT2LMHeadModel.from_pretrained("gpt2-124M-fineweb-edu")
    tokenizer = AutoTokenizer.from_pretrained("gpt2-124M-fineweb-edu")

Our parameter names are Hugging Face's, so the export is a copy: the four Conv1D weights are
transposed (train_gpt2.HF_TRANSPOSED, the list GPT.from_pretrained uses the other way) and the
vocabulary padding is dropped (50304 -> 50257 rows: the 47 extra tokens have no text). The
tokenizer files are GPT-2's own, from assets/gpt2: encoder.json as vocab.json, vocab.bpe as
merges.txt.
"""
import argparse
import os
import sys

import torch

import fineweb
import train_gpt2
from train_gpt2 import HF_BUFFERS, HF_TRANSPOSED, UserError

GPT2_VOCAB = 50257  # the tokenizer's vocabulary; the rows above it are padding
# transformers' names for GPT-2's tokenizer files, and OpenAI's (in assets/gpt2)
TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}


def to_hf(model):
    """A transformers GPT2LMHeadModel with our model's weights (eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel  # imported here: importing is free
    c = model.config
    vocab = min(c.vocab_size, GPT2_VOCAB)  # a smaller (test) vocabulary is exported as is
    hf_config = GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd,
                           n_layer=c.n_layer, n_head=c.n_head,
                           activation_function="gelu_new",  # = GELU with the tanh approximation
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # trained without dropout
    hf_model = GPT2LMHeadModel(hf_config).eval()
    sd_hf = hf_model.state_dict()
    sd = model.state_dict()
    keys = [k for k in sd_hf if not k.endswith(HF_BUFFERS)]  # weights only
    assert set(keys) == set(sd), f"key mismatch: {sorted(set(keys) ^ set(sd))}"
    with torch.no_grad():
        for k in keys:
            v = sd[k]
            if k.endswith(HF_TRANSPOSED):  # nn.Linear (out, in) -> Conv1D (in, out)
                v = v.t()
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v = v[:vocab]  # drop the padding rows (tied: one matrix under two names)
            assert v.shape == sd_hf[k].shape, f"{k}: {tuple(v.shape)} vs {tuple(sd_hf[k].shape)}"
            sd_hf[k].copy_(v)
    return hf_model


def write_tokenizer(out_dir, block_size):
    """GPT-2's tokenizer files, from assets/gpt2 (sha256 checked), as transformers names them."""
    for name, ours in TOKENIZER_FILES.items():
        data = fineweb.read_asset("gpt2", ours)
        fineweb.write_atomic(os.path.join(out_dir, name), lambda f: f.write(data))
    from transformers import GPT2TokenizerFast
    # read back from the folder, then saved: adds tokenizer.json and tokenizer_config.json
    GPT2TokenizerFast.from_pretrained(out_dir, model_max_length=block_size).save_pretrained(out_dir)


def main(argv=None):
    parser = fineweb.OneLineParser(description="Export one of our checkpoints as a transformers GPT-2 folder")
    parser.add_argument("--checkpoint", required=True, help="e.g. log/model_19073.pt (required)")
    parser.add_argument("--out", required=True, help="folder to write, created if needed (required)")
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UserError(f"--out {args.out} exists and is not a folder")
        model = train_gpt2.load_model(args.checkpoint)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # the summary below says what was written
        hf_model = to_hf(model)
        try:
            hf_model.save_pretrained(args.out)
            write_tokenizer(args.out, model.config.block_size)
        except OSError as e:  # an unwritable folder, a full disk
            raise UserError(f"cannot write {args.out}: {e.strerror or e}") from None
    except (UserError, fineweb.AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # check what was written: transformers' own loader gives our logits on the real vocabulary
    reloaded = type(hf_model).from_pretrained(args.out).eval()
    idx = torch.arange(min(16, model.config.block_size)).view(1, -1) % hf_model.config.vocab_size
    with torch.no_grad():
        ours = model(idx)[0][..., :hf_model.config.vocab_size]
        diff = (reloaded(idx).logits - ours).abs().max().item()
    # float32 kernels round differently (a wrong copy is off by O(1)): relative to the logits
    assert diff <= 1e-4 * max(1.0, ours.abs().max().item()), f"logits differ by {diff}"
    c = hf_model.config
    print(f"wrote {args.out}: GPT2LMHeadModel, {c.n_layer} layers, {c.n_head} heads, n_embd "
          f"{c.n_embd}, n_positions {c.n_positions}, vocab {c.vocab_size} (checkpoint: "
          f"{model.config.vocab_size}); max |logit difference| after reloading {diff:.1e}")
    print(f"wrote the GPT-2 tokenizer (vocab.json, merges.txt, tokenizer.json) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
