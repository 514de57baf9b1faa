"""
HellaSwag: pick the right ending of a sentence, four choices, scored by a language model.

https://github.com/rowanz/hellaswag. Each example is a context and four endings, one right:

    ctx:     "A man is sitting on a roof. he"
    endings: ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
              "is holding a rubik's cube.", "starts pulling up roofing on a roof."]
    label:   3 (the first val example)

A small base model cannot answer a multiple-choice question, so we do what the lecture does:
append each ending to the context, and ask which of the four the model finds most likely,
i.e. has the lowest cross-entropy over the ending tokens. `acc` compares the sums, `acc_norm`
the means (long endings are not punished for their length). The training loop reports
acc_norm. With this method, on the 10,042 val examples:

    gpt2 (124M)     acc 0.2859   acc_norm 0.2955
    gpt2-xl (1.5B)  acc 0.3842   acc_norm 0.4893

(EleutherAI's harness scores differently and gets 28.92 / 31.14 and 40.04 / 50.89.)

    python hellaswag.py -m gpt2 -d cuda                            # OpenAI's weights
    python hellaswag.py --checkpoint log/model_19073.pt -d cuda    # one of our checkpoints

The val set ships with the repository (assets/hellaswag/hellaswag_val.jsonl.gz, sha256
checked), so the usual evaluation needs no network; a hellaswag_{split}.jsonl in ./hellaswag
next to this file (or $HELLASWAG_DIR) is used instead when it is there, and the train and test
splits are downloaded there once. Importing this file is cheap: no tokenizer, no download, no
transformers.
"""
import argparse
import gzip
import itertools
import json
import os
import sys
from contextlib import nullcontext

import torch
from torch.nn import functional as F

import fineweb  # the shipped files, the atomic write, the tokenizer (imports nothing heavy)

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("train", "val", "test")
MODEL_TYPES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's four sizes
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")


class HellaSwagError(Exception):
    """A mistake the user can fix (no data, a bad file): one line, exit status 1."""


# -----------------------------------------------------------------------------
# Data: download once, then read the jsonl line by line

def data_dir():
    """The data folder: $HELLASWAG_DIR if set, else ./hellaswag next to this file.
    Read at call time, so a test (or a user) can change it after import."""
    return os.path.abspath(os.environ.get("HELLASWAG_DIR") or DATA_DIR)


def _folder(path):
    return os.path.abspath(path) if path is not None else data_dir()


SHIPPED = {"val": ("hellaswag", "hellaswag_val.jsonl.gz")}  # in assets/: all 10,042 val examples


def download(split, data_dir=None):
    """Returns the path of hellaswag_{split}.jsonl: the one in the data folder if it is there,
    else the copy in assets/ (val), else the file downloaded into the data folder."""
    if split not in SPLITS:
        raise HellaSwagError(f"unknown HellaSwag split {split!r}: use one of {', '.join(SPLITS)}")
    folder = _folder(data_dir)
    path = os.path.join(folder, f"hellaswag_{split}.jsonl")
    if os.path.exists(path):
        return path  # no network at all when the file is there
    if split in SHIPPED:
        return fineweb.asset_path(*SHIPPED[split])
    import requests
    from tqdm import tqdm

    url = URL.format(split=split)
    try:
        resp = requests.get(url, stream=True, timeout=30)
        resp.raise_for_status()
        total = int(resp.headers.get("content-length", 0)) or None

        def fetch(f):
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    bar.update(f.write(chunk))
        os.makedirs(folder, exist_ok=True)
        # to a temporary name, then renamed: an interrupted download leaves no truncated
        # file that the next run would take for the real one
        fineweb.write_atomic(path, fetch)
    except requests.RequestException as e:
        raise HellaSwagError(
            f"cannot download {url} ({type(e).__name__}); without network, put "
            f"hellaswag_{split}.jsonl in {folder} (or set HELLASWAG_DIR to its folder)") from None
    except OSError as e:
        raise HellaSwagError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def _check(example):
    """Why an example is unusable, or None if it is fine."""
    if not isinstance(example, dict):
        return "not a JSON object"
    if not isinstance(example.get("ctx"), str):
        return "'ctx' is missing or not a string"
    endings = example.get("endings")
    if not (isinstance(endings, list) and len(endings) == 4
            and all(isinstance(e, str) for e in endings)):
        return "'endings' is not a list of 4 strings"
    label = example.get("label")
    if type(label) is not int or not 0 <= label <= 3:  # type(): a bool is not a label
        return "'label' is missing or not an integer 0..3"
    return None


def iterate_examples(split, data_dir=None):
    """Yields the examples of a split as dicts with (at least) 'ctx', 'endings', 'label'."""
    path = download(split, data_dir)
    try:
        if path.endswith(".gz"):  # the copy in assets/: 3 MB, 12 MB of text once unpacked
            text = gzip.decompress(fineweb.read_asset(*SHIPPED[split])).decode()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except fineweb.AssetError as e:
        raise HellaSwagError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, a binary file
        why = getattr(e, "strerror", None) or type(e).__name__
        raise HellaSwagError(f"cannot read {path} ({why})") from None
    count = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise HellaSwagError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
        problem = _check(example)
        if problem:
            raise HellaSwagError(f"{path}, line {lineno}: {problem}")
        count += 1
        yield example
    if count == 0:  # an empty file: no accuracy to report
        raise HellaSwagError(f"{path} holds no examples")


# -----------------------------------------------------------------------------
# Rendering: one example -> four candidate token rows

def render_example(example, enc):
    """tokens (4, N) long: the context, then " " + ending, right-padded with 0.
    mask (4, N) long: 1 over the ending tokens (the ones we score), 0 elsewhere.
    The context is tokenized on its own, so all four rows share the same prefix."""
    ctx_tokens = enc.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end_tokens = enc.encode(" " + ending)  # GPT-2's BPE attaches the space to the word
        rows.append(ctx_tokens + end_tokens)
        masks.append([0] * len(ctx_tokens) + [1] * len(end_tokens))
    N = max(len(row) for row in rows)
    tokens = torch.zeros((4, N), dtype=torch.long)
    mask = torch.zeros((4, N), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask, example["label"]


def pad_length(rendered, multiple=32):
    """The one sequence length every batch is padded to: the longest example, rounded up
    to a multiple of 32 (192 for val). The training loop calls it on all examples, before
    splitting them over ranks, so that every rank runs the same shapes."""
    longest = max(tokens.size(1) for tokens, _, _ in rendered)
    return -(-longest // multiple) * multiple


# -----------------------------------------------------------------------------
# Scoring: the one function that turns logits into answers

def score(logits, tokens, mask):
    """logits (4k, L, V), tokens (4k, L), mask (4k, L): k examples, four rows each.
    Returns pred (k,) and pred_norm (k,): per example, the row with the lowest sum (acc) and
    the lowest mean (acc_norm) of the cross-entropy over its ending tokens."""
    R, L, V = logits.shape
    # the logits at position t predict token t+1: (R, L-1, V) against (R, L-1)
    shift_logits = logits[:, :-1, :]
    shift_tokens = tokens[:, 1:]
    shift_mask = mask[:, 1:].bool()
    # only one position in six is an ending token (val, seq_len 192): take just those,
    # upcast them to float32 (a log-softmax over 50,257 logits in bf16 would blur close
    # endings), and compute their loss; the rest is never copied
    sel_losses = F.cross_entropy(shift_logits[shift_mask].float(), shift_tokens[shift_mask],
                                 reduction="none")  # (number of ending tokens,)
    losses = torch.zeros(R, L - 1, dtype=torch.float32, device=logits.device)
    losses[shift_mask] = sel_losses  # back in place; 0 at the context and the padding
    sum_loss = losses.sum(dim=1)  # (R,)
    # max(1): the all-padding rows of a partial last batch have no ending tokens
    avg_loss = sum_loss / shift_mask.sum(dim=1).clamp(min=1)
    pred = sum_loss.view(-1, 4).argmin(dim=1)  # (k,)
    pred_norm = avg_loss.view(-1, 4).argmin(dim=1)
    return pred, pred_norm


def _block_size(model):
    """The model's block_size, also through torch.compile (_orig_mod) or DDP (module)."""
    while model is not None:
        config = getattr(model, "config", None)
        if config is not None:
            return config.block_size
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
    return None


BATCH_SIZE = 16  # examples per forward pass: (64, 192) tokens for val


def predict(model, rendered, device, batch_size=BATCH_SIZE, seq_len=None, autocast_dtype=None,
            num_batches=None):
    """An iterator of (pred, pred_norm), each (n,), for each batch of n <= batch_size examples.
    Every forward pass has the same shape (4 * batch_size, seq_len), so a compiled model
    compiles once: a partial batch is filled with rows of zeros, which are dropped. Right
    padding changes nothing for a causal model: no real token attends to a padded position.
    num_batches > the batches needed adds passes of padding only (yielding empty tensors), so
    that every rank of a run makes the same number of passes. Checks the length at once."""
    if not rendered and not num_batches:
        return iter(())
    seq_len = seq_len or pad_length(rendered)
    block_size = _block_size(model)
    if block_size is not None and seq_len > block_size:
        raise HellaSwagError(f"HellaSwag needs sequences of {seq_len} tokens, but the model's "
                             f"block_size is {block_size}")
    if num_batches is None:
        num_batches = -(-len(rendered) // batch_size)
    return _passes(model, rendered, torch.device(device), batch_size, seq_len, autocast_dtype, num_batches)


def _passes(model, rendered, device, batch_size, seq_len, autocast_dtype, num_batches):
    use_autocast = autocast_dtype is not None and autocast_dtype != torch.float32
    for start in range(0, num_batches * batch_size, batch_size):
        chunk = rendered[start:start + batch_size]
        tokens = torch.zeros((4 * batch_size, seq_len), dtype=torch.long)
        mask = torch.zeros((4 * batch_size, seq_len), dtype=torch.long)
        for i, (t, m, _) in enumerate(chunk):  # example i -> rows 4i..4i+3
            assert t.size(1) <= seq_len, f"an example of {t.size(1)} tokens > seq_len {seq_len}"
            tokens[4 * i:4 * i + 4, :t.size(1)] = t
            mask[4 * i:4 * i + 4, :m.size(1)] = m
        tokens, mask = tokens.to(device), mask.to(device)
        with torch.no_grad():
            with torch.autocast(device.type, autocast_dtype) if use_autocast else nullcontext():
                logits, _ = model(tokens)  # (4 * batch_size, seq_len, V)
            pred, pred_norm = score(logits, tokens, mask)  # in float32, outside autocast
        yield pred[:len(chunk)].cpu(), pred_norm[:len(chunk)].cpu()


def evaluate(model, rendered, device, batch_size=BATCH_SIZE, seq_len=None, autocast_dtype=None,
             progress=False, num_batches=None, should_stop=None):
    """Returns (num_correct, num_correct_norm, num_total) over the rendered examples, a list
    of (tokens, mask, label) from render_example. should_stop() is asked after every forward
    pass; when it says yes, evaluate stops there and returns None (the training loop's
    SIGTERM / Ctrl-C)."""
    from tqdm import tqdm
    labels = torch.tensor([label for _, _, label in rendered], dtype=torch.long)
    num_correct = num_correct_norm = num_total = 0
    batches = predict(model, rendered, device, batch_size, seq_len, autocast_dtype, num_batches)
    with tqdm(total=len(rendered), desc="hellaswag", unit="examples", disable=not progress) as bar:
        for pred, pred_norm in batches:
            y = labels[num_total:num_total + len(pred)]
            num_correct += (pred == y).sum().item()
            num_correct_norm += (pred_norm == y).sum().item()
            num_total += len(pred)
            bar.update(len(pred))
            bar.set_postfix(acc_norm=f"{num_correct_norm / max(1, num_total):.4f}")
            if should_stop is not None and should_stop():
                return None
    return num_correct, num_correct_norm, num_total


# -----------------------------------------------------------------------------
# Standalone evaluation of GPT-2 or of one of our checkpoints

def main(argv=None):
    import train_gpt2  # the model, its checkpoint format and the tokenizer loader live there
    parser = fineweb.OneLineParser(
        description="HellaSwag accuracy of GPT-2 or of one of our checkpoints",
        epilog="environment variables:\n  HELLASWAG_DIR        where hellaswag_{split}.jsonl is looked "
               "for and downloaded (default: ./hellaswag next to this file; val: the copy in assets/)\n"
               "  HF_HOME              Hugging Face's cache, for -m's weights\n"
               "  HF_ENDPOINT          a Hugging Face mirror for -m's weights (e.g. https://hf-mirror.com)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model_type", choices=MODEL_TYPES,
                        help="OpenAI's weights, loaded into our GPT through Hugging Face (default: none)")
    parser.add_argument("--checkpoint", help="one of our checkpoints, e.g. log/model_19073.pt (default: none)")
    parser.add_argument("-d", "--device", default="auto", help="cuda, mps or cpu (default: auto, the first there is)")
    parser.add_argument("--split", default="val", choices=SPLITS, help="(default: val)")
    parser.add_argument("--limit", type=fineweb.number(int, 1), default=None,
                        help="only the first N examples (default: all)")
    parser.add_argument("--batch_size", type=fineweb.number(int, 1), default=BATCH_SIZE,
                        help=f"examples per forward pass (default: {BATCH_SIZE})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32",
                        help="autocast dtype; auto: training's (default: float32, with TF32 matmuls on "
                        "CUDA: the setting of the reference figures; training evaluates in its own dtype)")
    args = parser.parse_args(argv)
    try:
        if (args.model_type is None) == (args.checkpoint is None):
            raise HellaSwagError("give exactly one of -m/--model_type and --checkpoint")
        device = train_gpt2.pick_device(args.device)
        dtype, _ = train_gpt2.pick_dtype(args.dtype, device)  # auto: training's choice
        if device.startswith("cuda"):
            torch.set_float32_matmul_precision("high")  # TF32, as the reference evaluated
        # the data first: a missing or broken file fails before a big model is loaded
        enc = fineweb.gpt2_encoding()
        examples = itertools.islice(iterate_examples(args.split), args.limit)
        rendered = [render_example(example, enc) for example in examples]
        if not rendered:
            raise HellaSwagError(f"no examples in the {args.split} split")
        model = train_gpt2.load_model(args.checkpoint, args.model_type, device)
        name = args.model_type or args.checkpoint
        seq_len = pad_length(rendered)
        print(f"{name}: {len(rendered)} {args.split} examples, device {device}, dtype {str(dtype)[6:]}, "
              f"batch {args.batch_size} x 4 rows x {seq_len} tokens")
        num_correct, num_correct_norm, num_total = evaluate(
            model, rendered, device, batch_size=args.batch_size, seq_len=seq_len,
            autocast_dtype=dtype, progress=True)
    except (HellaSwagError, train_gpt2.UserError, fineweb.AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"acc: {num_correct}/{num_total} = {num_correct / num_total:.4f}")
    print(f"acc_norm: {num_correct_norm}/{num_total} = {num_correct_norm / num_total:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
