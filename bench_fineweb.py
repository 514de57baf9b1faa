"""Tokens/s of fineweb.py against a plain per-document Pool.imap baseline, on the same corpus.

A standalone script, not a test. The corpus is tiny shakespeare (the copy in assets/) cut into
documents of about --doc_chars characters (FineWeb-Edu's documents average ~4.5k characters,
~1k tokens), replicated --copies times, written as jsonl.
Both sides read it through the same datasets cache, tokenize with the same --num_proc pool and
write shards of the same size; the shards must come out byte-identical.

    python bench_fineweb.py                              # ~20M tokens, 4.5k-char documents
    python bench_fineweb.py --doc_chars 300 --copies 5   # many short documents
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

import fineweb


# -----------------------------------------------------------------------------
# the baseline: the reference's loop, one document per imap item (chunksize 16)

enc = None


def init_baseline():
    global enc
    enc = fineweb.gpt2_encoding()  # = tiktoken.get_encoding("gpt2"), without the download


def tokenize_doc(doc):
    tokens = np.array([fineweb.EOT] + enc.encode_ordinary(doc["text"]))
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token dictionary too large for uint16"
    return tokens.astype(np.uint16)


def baseline(path, out, shard_size, num_proc):
    import datasets
    ds = datasets.load_dataset("json", data_files=path, split="train")
    buf, fill, index, total = np.empty(shard_size, dtype=np.uint16), 0, 0, 0
    with Pool(num_proc, initializer=init_baseline) as pool:
        for tokens in pool.imap(tokenize_doc, ds, chunksize=16):
            total += len(tokens)
            while len(tokens):
                take = min(shard_size - fill, len(tokens))
                buf[fill:fill + take], fill, tokens = tokens[:take], fill + take, tokens[take:]
                if fill == shard_size:
                    np.save(os.path.join(out, fineweb.shard_filename(fineweb.split_of(index), index)), buf)
                    fill, index = 0, index + 1
        if fill:
            np.save(os.path.join(out, fineweb.shard_filename(fineweb.split_of(index), index)), buf[:fill])
    return total


# -----------------------------------------------------------------------------


def cpu_seconds():
    # this process and its reaped children (the pool workers, once the pool has closed)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def make_corpus(path, doc_chars, copies):
    text = fineweb.read_asset("tinyshakespeare", "input.txt").decode()
    docs, cur = [], []
    for para in text.split("\n\n"):
        cur.append(para)
        if sum(map(len, cur)) >= doc_chars:
            docs.append("\n\n".join(cur))
            cur = []
    with open(path, "w") as f:
        for c in range(copies):
            for i, d in enumerate(docs):
                f.write(json.dumps({"id": f"{c}-{i}", "text": d, "url": f"https://example.com/{i}"}) + "\n")
    return len(docs) * copies


def main(argv=None):
    p = fineweb.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive = fineweb.number(int, 1)
    p.add_argument("--doc_chars", type=positive, default=4500,
                   help="characters per document, about (default: %(default)s)")
    p.add_argument("--copies", type=positive, default=60,
                   help="times the corpus holds tiny shakespeare (default: %(default)s)")
    p.add_argument("--num_proc", type=positive, nargs="+", default=[max(1, (os.cpu_count() or 2) // 2)],
                   help="pool sizes to measure, each for both sides (default: %(default)s)")
    p.add_argument("--shard_size", type=positive, default=10**6, help="tokens per shard (default: %(default)s)")
    p.add_argument("--repeats", type=positive, default=3,
                   help="runs of each side, interleaved; the median is reported (default: %(default)s)")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_fineweb_")
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp)


def run(args, tmp):
    os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "hf")
    import datasets
    datasets.disable_progress_bars()

    path = os.path.join(tmp, "corpus.jsonl")
    n_docs = make_corpus(path, args.doc_chars, args.copies)
    datasets.load_dataset("json", data_files=path, split="train")  # both sides read this Arrow cache
    print(f"corpus: {n_docs:,} documents, {os.path.getsize(path) / 1e6:.0f} MB jsonl; "
          f"{os.cpu_count()} CPUs; shard_size {args.shard_size:,}")

    for num_proc in args.num_proc:
        rates, cpu = {"baseline": [], "fineweb": []}, {"baseline": [], "fineweb": []}
        for r in range(args.repeats):  # interleaved, so both see the same machine load
            base_dir = os.path.join(tmp, f"baseline_{num_proc}_{r}")
            ours_dir = os.path.join(tmp, f"fineweb_{num_proc}_{r}")
            os.makedirs(base_dir)
            t0, c0 = time.time(), cpu_seconds()
            n = baseline(path, base_dir, args.shard_size, num_proc)
            rates["baseline"].append(n / (time.time() - t0))
            cpu["baseline"].append((cpu_seconds() - c0) / n * 1e6)
            t0, c0 = time.time(), cpu_seconds()
            fineweb.main([str(a) for a in ["--data_files", path, "--local_dir", ours_dir, "--shard_size",
                                           args.shard_size, "--num_proc", num_proc]])
            rates["fineweb"].append(n / (time.time() - t0))
            cpu["fineweb"].append((cpu_seconds() - c0) / n * 1e6)
            ours_files = sorted(n for n in os.listdir(ours_dir) if n.endswith(".npy"))
            assert sorted(os.listdir(base_dir)) == ours_files, "different shard files"
            for name in os.listdir(base_dir):
                same = Path(base_dir, name).read_bytes() == Path(ours_dir, name).read_bytes()
                assert same, f"{name} differs between the baseline and fineweb.py"
        base, ours = (statistics.median(rates[k]) for k in ("baseline", "fineweb"))
        print(f"num_proc {num_proc}: {n:,} tokens; median of {args.repeats}: "
              f"baseline {base:,.0f} tokens/s, "
              f"fineweb.py {ours:,.0f} tokens/s, ratio {ours / base:.2f}x  "
              f"(runs: {[round(x / 1e6, 2) for x in rates['baseline']]} vs "
              f"{[round(x / 1e6, 2) for x in rates['fineweb']]} M tokens/s)")
        base_cpu, ours_cpu = (statistics.median(cpu[k]) for k in ("baseline", "fineweb"))
        print(f"  CPU seconds per million tokens (all processes, median): baseline {base_cpu:.3f}, "
              f"fineweb.py {ours_cpu:.3f}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
