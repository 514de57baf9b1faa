"""
FineWeb-Edu -> GPT-2 token shards for train_gpt2.py.

Downloads the 10B-token sample of FineWeb-Edu (HuggingFaceFW/fineweb-edu, config sample-10BT),
tokenizes every document with tiktoken's GPT-2 encoding as [<|endoftext|>] + tokens, and cuts
the stream into shards of exactly 100M uint16 tokens: shard 0 is "val", the rest "train"
(about 1 val + 99 train shards), written as edu_fineweb10B/edufineweb_{split}_{index:06d}.npy
next to this script, whatever the working directory.

    python fineweb.py                                                  # the real run (~10B tokens)
    python fineweb.py --max_tokens 20000000                            # a sample, streamed from the hub
    python fineweb.py --data_files my/*.parquet --max_tokens 2000000   # offline, from local files

--data_files takes parquet or jsonl/json files with a "text" column, or txt files (one document
per file); all of them are read through Hugging Face datasets, like the hub.

Interrupted or killed? Run the same command again. Every shard is written to a temporary file and
renamed, and <local_dir>/manifest.json records where in the corpus each finished shard ended, so
the rerun continues after the last complete shard and writes the same bytes as one clean run.
A folder that holds shards of another run (other source, --shard_size or --max_tokens) is refused;
--overwrite deletes its shards and manifest and starts over.
"""
import argparse
import glob
import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

# -----------------------------------------------------------------------------
# The real run (train_gpt2.py imports LOCAL_DIR)

DATASET, CONFIG = "HuggingFaceFW/fineweb-edu", "sample-10BT"
LOCAL_DIR = str(Path(__file__).resolve().parent / "edu_fineweb10B")  # next to the script, not the cwd
SHARD_SIZE = 10**8  # tokens per shard
EOT = 50256  # GPT-2's <|endoftext|>, in front of (not after) every document
DOCS_PER_TASK = 256  # documents per pool task: ~1 MB of FineWeb-Edu text, so task overhead vanishes
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


def shard_filename(split, index):
    return f"edufineweb_{split}_{index:06d}.npy"


def split_of(index):
    return "val" if index == 0 else "train"  # the first 100M tokens are the validation set


def fail(message):
    raise SystemExit(f"fineweb.py: error: {message}")  # one line on stderr, exit status 1


# -----------------------------------------------------------------------------
# Tokenizing, in the pool workers. Module level, so that spawn (macOS, Windows) can pickle it.
# tiktoken releases the GIL while it encodes, so each worker also runs threads: with the default
# --num_proc (half the cores) every worker gets two, and every core is busy. Each thread has its
# own Encoding: tiktoken's regex runs at full speed only in the first thread that uses it (a
# second thread sharing it costs ~30% more CPU per token, measured).

_spec, _threads, _num_threads, _local = None, None, 1, threading.local()
_EOT = np.array([EOT], dtype=np.uint32)


class TokenRangeError(ValueError):
    pass


def init_worker(spec, num_threads):
    global _spec, _threads, _num_threads
    from concurrent.futures import ThreadPoolExecutor

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _spec, _num_threads = spec, num_threads
    _threads = ThreadPoolExecutor(num_threads, initializer=_init_thread)


def _init_thread():
    import tiktoken
    _local.enc = tiktoken.Encoding(**_spec)


def _encode(texts):
    # one thread's share of a task: its documents as one flat uint16 array, and their lengths
    enc, parts, lengths = _local.enc, [], []
    for text in texts:
        # = encode_ordinary ("<|endoftext|>" in the text is just text), but straight into a numpy
        # array: no list of Python ints to build and convert (~20% less CPU per token, measured)
        tokens = enc.encode_to_numpy(text, disallowed_special=())
        parts += [_EOT, tokens]
        lengths.append(len(tokens) + 1)
    flat = np.concatenate(parts)  # uint32, as tiktoken returns them
    if flat.max() >= 2**16:  # GPT-2's 50,257 ids fit; another encoding might not
        raise TokenRangeError(f"token id {flat.max()} does not fit in uint16")
    return flat.astype(np.uint16), lengths


def tokenize_batch(texts):
    """Documents -> (uint16 array of [EOT] + tokens of each, in order; int64 length of each)."""
    step = -(-len(texts) // _num_threads)  # contiguous slices keep the documents in order
    parts = list(_threads.map(_encode, [texts[i:i + step] for i in range(0, len(texts), step)]))
    lengths = np.array([n for _, lengths in parts for n in lengths], dtype=np.int64)
    return np.concatenate([flat for flat, _ in parts]), lengths


# -----------------------------------------------------------------------------
# Reading the corpus: the hub, or local files for offline machines and tests


def find_data_files(patterns):
    """Expands the globs (sorted, so the document order is fixed); checks each file's columns."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            fail(f"--data_files {pattern} matches no file")
        files += [m for m in map(os.path.abspath, matches) if m not in files]
    builders = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders or len(builders) > 1:
        suffixes = sorted({Path(f).suffix or "(none)" for f in files})
        fail(f"--data_files must be all .parquet, all .jsonl/.json or all .txt, not {', '.join(suffixes)}")
    for f in files:  # look at the columns now, before datasets spends minutes converting the files
        columns = None
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq
            columns = pq.read_schema(f).names
        elif f.endswith(".jsonl"):
            with open(f, encoding="utf-8") as fh:
                line = fh.readline()
            columns = list(json.loads(line)) if line.strip() else None
        if columns is not None and "text" not in columns:
            fail(f"{f} has no 'text' column (it has: {', '.join(columns)})")
    return files, builders.pop()


def load_corpus(files, builder, streaming):
    """The corpus as a datasets Dataset (an IterableDataset when streaming), in document order."""
    import datasets

    if files:
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming,
                                       **kwargs)
        except Exception as e:  # a malformed file: say what datasets said, without the traceback
            fail(f"cannot read --data_files ({type(e).__name__}: {e})".splitlines()[0])
    else:
        try:
            ds = datasets.load_dataset(DATASET, name=CONFIG, split="train", streaming=streaming)
        except OSError as e:  # ConnectionError, the hub's HTTP errors, offline mode
            fail(f"cannot load {DATASET} from the Hugging Face hub ({type(e).__name__}); "
                 "no network? use --data_files with local files")
    if ds.column_names is not None and "text" not in ds.column_names:
        fail(f"the corpus has no 'text' column (it has: {', '.join(ds.column_names)})")
    return ds


def text_batches(ds, skip_docs):
    """Lists of DOCS_PER_TASK document texts, after the first skip_docs documents."""
    if skip_docs:
        ds = ds.skip(skip_docs)  # streaming: reads past them; on disk: an index shift, no reading
    if ds.column_names is not None:
        ds = ds.select_columns(["text"])  # don't decode the other columns (url, score, ...)
    for batch in ds.iter(batch_size=DOCS_PER_TASK):
        if "text" not in batch:  # streaming json knows its columns only once it reads
            fail(f"the corpus has no 'text' column (it has: {', '.join(batch)})")
        yield batch["text"]


# -----------------------------------------------------------------------------
# Writing so that a kill at any moment leaves only complete files


def write_atomic(path, write):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name says the file is complete
    os.replace(tmp, path)  # atomic on POSIX and Windows: the old file or the new one, never half


def write_shard(path, tokens):
    write_atomic(path, lambda f: np.save(f, tokens))


def save_manifest(path, manifest):
    write_atomic(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def check_folder(out, identity, overwrite):
    """The manifest to continue from: the one an earlier run of this job left, or a new one."""
    path, manifest = os.path.join(out, "manifest.json"), None
    ours = [n for n in os.listdir(out) if n.startswith("edufineweb_")]
    if overwrite:
        for name in ours + ["manifest.json"] * os.path.exists(path):
            os.remove(os.path.join(out, name))
        ours = []
    elif os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
        if not manifest["shards"]:
            manifest = None  # nothing finished yet: start afresh, whatever it was for
        elif manifest["identity"] != identity:  # never mix two corpora or two shard sizes
            diff = ", ".join(k for k in identity if manifest["identity"].get(k) != identity[k])
            fail(f"{out} holds shards of another run (different {diff}); "
                 "pass --overwrite to start over, or choose another --local_dir")
        for shard in manifest["shards"] if manifest else []:
            if not os.path.exists(os.path.join(out, shard["file"])):
                fail(f"{shard['file']}, listed in {path}, is gone; pass --overwrite to start over")
    elif any(n.endswith(".npy") for n in ours):
        fail(f"{out} holds shards but no manifest.json; pass --overwrite to start over, "
             "or choose another --local_dir")
    for name in ours:
        if name.endswith(".tmp"):  # a killed run's half-written file
            os.remove(os.path.join(out, name))
    return manifest or {"identity": identity, "shards": [], "done": False}


# -----------------------------------------------------------------------------
# The pipeline: documents -> one token stream -> shards of shard_size


def write_shards(batches, out, manifest, shard_size, max_tokens, num_proc):
    """Tokenizes the batches in a process pool and cuts the stream into shards; returns the tokens."""
    from multiprocessing import Pool

    from tiktoken_ext.openai_public import gpt2  # what tiktoken.get_encoding("gpt2") is made from
    from tqdm import tqdm

    try:  # here, once: a worker whose initializer fails is respawned by the pool, forever
        spec = gpt2()
    except Exception as e:
        fail(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}); no network? "
             "point TIKTOKEN_CACHE_DIR at a folder with its files")
    S, shards = shard_size, manifest["shards"]
    save_manifest(os.path.join(out, "manifest.json"), manifest)  # before shard 0: never an orphan shard
    index, total = len(shards), sum(s["tokens"] for s in shards)
    doc, offset = (shards[-1]["next_doc"], shards[-1]["next_offset"]) if shards else (0, 0)
    stop = (doc, offset)  # where the stream has got to: (document index, token inside it)
    limit = max_tokens or float("inf")
    buf, fill = np.empty(S, dtype=np.uint16), 0  # the only big allocation: memory stays flat
    bar = tqdm(total=max_tokens, initial=total, unit="tokens", unit_scale=True,
               bar_format=None if max_tokens else "{desc}: {n_fmt}tokens [{elapsed}, {rate_fmt}]")
    bar.set_description(shard_filename(split_of(index), index))

    def finish_shard(n, last):
        nonlocal index
        name = shard_filename(split_of(index), index)
        write_shard(os.path.join(out, name), buf[:n])
        shards.append({"file": name, "tokens": n, "next_doc": stop[0], "next_offset": stop[1]})
        manifest["done"] = last
        save_manifest(os.path.join(out, "manifest.json"), manifest)  # after the shard, never ahead
        index += 1
        if not last:
            bar.set_description(shard_filename(split_of(index), index))

    threads = max(1, min(8, (os.cpu_count() or 1) // num_proc))  # the cores the pool leaves over
    with bar, Pool(num_proc, initializer=init_worker, initargs=(spec, threads)) as pool:
        # imap keeps document order; the pipe to the workers holds only a few tasks at a time
        for tokens, lengths in pool.imap(tokenize_batch, batches):
            ends = np.cumsum(lengths)  # where each document ends inside `tokens`
            pos, offset = offset, 0  # only the first document after a resume starts part-way
            while pos < len(tokens) and total < limit:
                take = int(min(S - fill, len(tokens) - pos, limit - total))
                buf[fill:fill + take] = tokens[pos:pos + take]
                fill, pos, total = fill + take, pos + take, total + take
                bar.update(take)
                d = int(np.searchsorted(ends, pos, side="right"))  # documents of this batch now done
                stop = (doc + d, pos - (int(ends[d - 1]) if d else 0))
                if fill == S:
                    finish_shard(S, last=False)
                    fill = 0
            doc += len(lengths)
            if total >= limit:
                break
        if fill:
            finish_shard(fill, last=True)  # the last shard is partial
    if not manifest["done"]:  # the stream ended on a shard boundary
        manifest["done"] = True
        save_manifest(os.path.join(out, "manifest.json"), manifest)
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_dir", default=LOCAL_DIR, help="output folder (default: %(default)s)")
    p.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="tokens per shard")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="tokenizer processes (default: half the cores, as in the reference)")
    p.add_argument("--data_files", nargs="+", help="local parquet/jsonl/json/txt files or globs")
    p.add_argument("--max_tokens", type=int, help="stop after this many tokens (the hub is streamed)")
    p.add_argument("--overwrite", action="store_true", help="delete this folder's shards, start over")
    args = p.parse_args(argv)
    if min(args.shard_size, args.num_proc, args.max_tokens or 1) < 1:
        p.error("--shard_size, --num_proc and --max_tokens must be positive")

    files, builder = find_data_files(args.data_files) if args.data_files else ([], None)
    out = os.path.abspath(args.local_dir)
    os.makedirs(out, exist_ok=True)
    identity = {"source": {"data_files": files} if files else {"dataset": DATASET, "config": CONFIG},
                "shard_size": args.shard_size, "max_tokens": args.max_tokens}
    manifest = check_folder(out, identity, args.overwrite)
    shards = manifest["shards"]
    before = sum(s["tokens"] for s in shards)
    if manifest["done"]:
        print(f"already done: {len(shards)} shards, {before:,} tokens in {out} (--overwrite redoes it)")
        return 0

    t0 = time.time()
    try:
        ds = load_corpus(files, builder, streaming=args.max_tokens is not None)
        # resume: skip the documents that earlier shards consumed (write_shards cuts the next one)
        batches = text_batches(ds, skip_docs=shards[-1]["next_doc"] if shards else 0)
        # the first batch is read here, not in the pool's feeder thread, so a bad corpus fails cleanly
        first = next(batches, None)
        batches = itertools.chain([first], batches) if first is not None else iter(())
        total = write_shards(batches, out, manifest, args.shard_size, args.max_tokens, args.num_proc)
    except TokenRangeError as e:
        fail(e)
    except OSError as e:  # network gone mid-stream, disk full, ...: the finished shards are safe
        fail(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}; "
             "rerun the same command to continue after the last finished shard")
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to continue after the last finished shard")
    dt = time.time() - t0
    print(f"wrote {len(shards)} shards, {total:,} tokens in {out} in {dt:.1f}s "
          f"({(total - before) / dt:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
