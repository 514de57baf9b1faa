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
per file); all of them are read through Hugging Face datasets, like the hub. A row whose text is
null, missing or not a string is skipped (no tokens, no <|endoftext|>) and counted in the summary.

Interrupted or killed? Run the same command again. Every shard is written to a temporary file and
renamed, and <local_dir>/manifest.json records where in the corpus each finished shard ended, so
the rerun continues after the last complete shard and writes the same bytes as one clean run.
Ctrl-C or SIGTERM (kill, a batch scheduler, a process-group or cgroup-wide stop) stops the workers,
prints one line and exits with status 1, like every other error; a second SIGTERM kills at once.
A folder that holds shards of another run (other source, --shard_size or --max_tokens) is refused;
--overwrite deletes its shards and manifest and starts over.
"""
import argparse
import contextlib
import glob
import itertools
import json
import math
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
LOCK = "fineweb.lock"  # in --local_dir while a run writes there
# the oldest versions with Encoding.encode_to_numpy and Dataset.skip (checked in their wheels)
TIKTOKEN_MIN, DATASETS_MIN = "0.9.0", "2.19.0"


# -----------------------------------------------------------------------------
# The files the repository ships in assets/, so that nothing a repository can carry is
# downloaded: GPT-2's tokenizer, tiny shakespeare, HellaSwag's val set (assets/README.md)

ASSETS = Path(__file__).resolve().parent / "assets"
ASSET_SHA256 = {  # each file's sha256, checked whenever it is read
    "gpt2/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "tinyshakespeare/input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "hellaswag/hellaswag_val.jsonl.gz": "92e264a59ebdb8402af53a9ca4178ead281dcba5ccb6c0ffd39c016ba64bbaa2",
}
# GPT-2's pre-tokenizer: text is cut into words, numbers, punctuation and whitespace runs
# before BPE merges within each piece (tiktoken's spelling of OpenAI's regex for "gpt2")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class AssetError(Exception):
    """A shipped file that is missing or damaged, or a package too old to read it: one line."""


def asset_path(*parts):
    return str(ASSETS.joinpath(*parts))


def read_asset(*parts):
    """The bytes of a file in assets/, after checking its sha256 (a damaged clone or a checkout
    that rewrote line endings would otherwise give silently wrong tokens)."""
    import hashlib
    name, path = "/".join(parts), asset_path(*parts)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AssetError(f"cannot read {path} ({e.strerror or e}): it ships with the repository; "
                         "restore it with `git checkout -- assets`") from None
    if hashlib.sha256(data).hexdigest() != ASSET_SHA256[name]:
        raise AssetError(f"{path} is damaged (its sha256 is not the one in assets/README.md): "
                         "restore it with `git checkout -- assets`")
    return data


def format_bytes(n):
    """1.52 GiB, 200.0 MiB, 12.0 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n / 2**10:.1f} KiB"


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


def gpt2_spec():
    """The arguments of tiktoken.Encoding for GPT-2, from which every worker thread builds its own:
    built from the tokenizer files in assets/, so nothing is downloaded (tiktoken's own
    get_encoding("gpt2") fetches the same files from OpenAI's servers)."""
    import tiktoken
    if not hasattr(tiktoken.Encoding, "encode_to_numpy"):
        raise AssetError(f"needs tiktoken >= {TIKTOKEN_MIN} (Encoding.encode_to_numpy); "
                         "pip install -U tiktoken")
    encoder = json.loads(read_asset("gpt2", "encoder.json"))  # {token as text: rank}
    # encoder.json spells each byte of a token as one printable character (OpenAI's
    # bytes_to_unicode): the 188 printable bytes but space as themselves, the other 68 as
    # chr(256 + n), in byte order. Back to bytes, it is the table of BPE merge ranks.
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    byte_of = {chr(b): b for b in printable}
    byte_of.update((chr(256 + n), b) for n, b in enumerate(b for b in range(256) if b not in printable))
    ranks = {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items()
             if token != "<|endoftext|>"}
    return dict(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


def gpt2_encoding():
    """GPT-2's tokenizer: the lecture's tiktoken.get_encoding("gpt2"), with no download."""
    import tiktoken
    return tiktoken.Encoding(**gpt2_spec())


def init_worker(spec, num_threads):
    global _spec, _threads, _num_threads
    from concurrent.futures import ThreadPoolExecutor

    # Ctrl-C and SIGTERM are the main process's to handle. A SIGTERM for the whole process group or
    # cgroup (systemd, Slurm) reaches the workers too: one that died of it could hold a lock of the
    # pool's queues, and pool.terminate() would wait for that lock forever. So they ignore it, and
    # the pool's terminate() kills them with SIGKILL instead (KillingPool in write_shards).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _spec, _num_threads = spec, num_threads
    _threads = ThreadPoolExecutor(num_threads, initializer=_init_thread)


def _init_thread():
    import tiktoken
    _local.enc = tiktoken.Encoding(**_spec)


def _encode(texts):
    # one thread's share of a task: its documents as one flat uint16 array, and their lengths
    enc, parts, lengths = _local.enc, [], []
    for text in texts:
        if not isinstance(text, str):  # null, missing or not text: web corpora have a few such rows
            lengths.append(0)  # no tokens, no EOT; still a document of the corpus, for resume
            continue
        # = encode_ordinary ("<|endoftext|>" in the text is just text), but straight into a numpy
        # array: no list of Python ints to build and convert (~20% less CPU per token, measured)
        tokens = enc.encode_to_numpy(text, disallowed_special=())
        parts += [_EOT, tokens]
        lengths.append(len(tokens) + 1)
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)  # uint32, as tiktoken's
    if len(flat) and flat.max() >= 2**16:  # GPT-2's 50,257 ids fit; another encoding might not
        raise TokenRangeError(f"token id {flat.max()} does not fit in uint16")
    return flat.astype(np.uint16), lengths


def tokenize_batch(texts):
    """Documents -> (uint16 array of [EOT] + tokens of each, in order; int64 length of each).

    A skipped row (text not a string) has length 0."""
    step = -(-len(texts) // _num_threads)  # contiguous slices keep the documents in order
    parts = list(_threads.map(_encode, [texts[i:i + step] for i in range(0, len(texts), step)]))
    lengths = np.array([n for _, lengths in parts for n in lengths], dtype=np.int64)
    return np.concatenate([flat for flat, _ in parts]), lengths


# -----------------------------------------------------------------------------
# Reading the corpus: the hub, or local files for offline machines and tests


def find_data_files(patterns):
    """The files, in a fixed order: an existing path as it is (even with [ or * in its name), else
    the matches of the glob, sorted. Checks their columns early."""
    files = []
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        matches = [path] if os.path.exists(path) else sorted(glob.glob(path, recursive=True))
        if not matches:
            fail(f"--data_files {pattern} matches no file")
        files += [m for m in map(os.path.abspath, matches) if m not in files]
    builders = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders or len(builders) > 1:
        suffixes = sorted({Path(f).suffix or "(none)" for f in files})
        fail(f"--data_files must be all .parquet, all .jsonl/.json or all .txt, not {', '.join(suffixes)}")
    for f in files:  # look at the columns now, before datasets spends minutes converting the files
        columns = None
        if not os.path.isfile(f):
            fail(f"--data_files {f} is not a file")
        if f.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq
            try:
                columns = pq.read_schema(f).names
            except (pa.ArrowException, OSError) as e:  # cut short, not parquet
                fail(f"--data_files {f} is not a readable parquet file ({str(e).splitlines()[0][:200]})")
        elif f.endswith(".jsonl"):
            columns = jsonl_columns(f)
        if columns is not None and "text" not in columns:
            fail(f"{f} has no 'text' column (it has: {', '.join(columns)})")
    return files, builders.pop()


def jsonl_columns(path, rows=100):
    """The keys of the first rows (one of them may lack "text": it is skipped); None if they are not
    all JSON objects, for datasets to report."""
    columns = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in itertools.islice(f, rows):
            try:
                row = json.loads(line)
            except ValueError:
                return None
            if not isinstance(row, dict):
                return None
            columns.update(dict.fromkeys(row))
    return list(columns) or None


def load_corpus(files, builder, streaming):
    """The corpus as a datasets Dataset (an IterableDataset when streaming), in document order."""
    import datasets

    if not hasattr(datasets.Dataset, "skip"):
        fail(f"needs datasets >= {DATASETS_MIN} (for Dataset.skip); pip install -U datasets")
    if files:
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        import logging
        quiet = logging.getLogger("datasets.packaged_modules")  # it logs a malformed file's traceback
        level, _ = quiet.level, quiet.setLevel(logging.CRITICAL)
        try:  # datasets reads data_files as globs: escape the [ * ? of the names we already found
            ds = datasets.load_dataset(builder, data_files=[glob.escape(f) for f in files],
                                       split="train", streaming=streaming, **kwargs)
        except Exception as e:  # a malformed file: say what datasets said, without the traceback
            cause = e.__cause__ or e.__context__ or e  # datasets wraps the reader's error
            fail(f"cannot read --data_files {', '.join(files)} ({type(e).__name__}: {e}; "
                 f"{type(cause).__name__}: {cause})".replace("\n", " ")[:600])
        finally:
            quiet.setLevel(level)
    else:
        try:
            ds = datasets.load_dataset(DATASET, name=CONFIG, split="train", streaming=streaming)
        except OSError as e:  # ConnectionError, the hub's HTTP errors, offline mode
            fail(f"cannot load {DATASET} from the Hugging Face hub ({type(e).__name__}); no network? "
                 "set HF_ENDPOINT to a mirror of the hub, or use --data_files with local files")
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
    """Write to path + '.tmp', flush, fsync, rename: a crash leaves the old file or the new one,
    never half of one; on error the temporary file is removed."""
    tmp = os.fspath(path) + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name says the file is complete
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException as e:  # disk full, Ctrl-C, ...: no half-written file is left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            e.filename = os.fspath(path)  # a failed write() or fsync() does not say which file
        raise


def write_shard(path, tokens):
    """np.save's bytes, written by Python's file: np.save's own writer says nothing but
    "50000 requested and 24512 written" on a full disk, an OSError without errno or file."""
    def write(f):
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(tokens))
        f.write(np.ascontiguousarray(tokens).data.cast("B"))
    write_atomic(path, write)


def save_manifest(path, manifest):
    write_atomic(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def make_folder(local_dir):
    """--local_dir as an absolute path (taken literally: no globbing), created, checked writable."""
    import tempfile

    out = os.path.abspath(local_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--local_dir {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # permissions, a read-only disk: say so now, not later
            pass
    except OSError as e:
        fail(f"cannot write to --local_dir {out} ({e.strerror or e})")
    return out


def read_manifest(path):
    """manifest.json, or one error line when it is damaged: without it the shards cannot be
    continued, and they are never deleted unasked (hours of work at full size)."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        assert isinstance(manifest, dict) and isinstance(manifest["shards"], list)
        for shard in manifest["shards"]:
            assert {"file", "tokens", "next_doc", "next_offset"} <= set(shard)
        manifest["identity"], manifest["done"]  # noqa: B018
    except (OSError, ValueError, AssertionError, KeyError, TypeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        fail(f"{path} is damaged or unreadable ({why}); pass --overwrite to write the shards again")
    return manifest


def shard_damage(path, tokens):
    """Why a finished shard is not what the manifest says (None: it is): cut short, not a
    1-D uint16 array, a folder. Reads only its header."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        return getattr(e, "strerror", None) or type(e).__name__
    if array.ndim != 1 or array.dtype != np.uint16 or len(array) != tokens:
        return f"{array.dtype} {array.shape}, not {tokens} uint16 tokens"
    return None


def check_folder(out, identity, overwrite):
    """The manifest to continue from: the one an earlier run of this job left, or a new one."""
    path, manifest = os.path.join(out, "manifest.json"), None
    ours = [n for n in os.listdir(out) if n.startswith("edufineweb_")]
    if overwrite:
        for name in ours + ["manifest.json"] * os.path.exists(path):
            os.remove(os.path.join(out, name))
        ours = []
    elif os.path.exists(path):
        manifest = read_manifest(path)
        if not manifest["shards"]:
            manifest = None  # nothing finished yet: start afresh, whatever it was for
        elif manifest["identity"] != identity:  # never mix two corpora or two shard sizes
            diff = ", ".join(k for k in identity if manifest["identity"].get(k) != identity[k])
            fail(f"{out} holds shards of another run (different {diff}); "
                 "pass --overwrite to start over, or choose another --local_dir")
        for i, shard in enumerate(manifest["shards"] if manifest else []):
            if not os.path.exists(os.path.join(out, shard["file"])):
                fail(f"{shard['file']}, listed in {path}, is gone; pass --overwrite to start over")
            if os.path.isdir(os.path.join(out, shard["file"])):
                fail(f"{os.path.join(out, shard['file'])} is a folder, where a shard belongs: remove it")
            damage = shard_damage(os.path.join(out, shard["file"]), shard["tokens"])
            if damage:  # cut short, overwritten: write it (and the ones after it) again
                print(f"warning: {shard['file']} is damaged ({damage}); writing it again from there",
                      file=sys.stderr)
                for later in manifest["shards"][i:]:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(out, later["file"]))
                del manifest["shards"][i:]
                manifest["done"] = False
                break
    elif any(n.endswith(".npy") for n in ours):
        fail(f"{out} holds shards but no manifest.json; pass --overwrite to start over, "
             "or choose another --local_dir")
    for name in ours:
        if name.endswith(".tmp"):  # a killed run's half-written file
            os.remove(os.path.join(out, name))
    return manifest or {"identity": identity, "shards": [], "done": False}


# -----------------------------------------------------------------------------
# One run per folder: a lock file held for the run's length (this script's --local_dir, and
# train_gpt2.py's --log_dir), so that a forgotten second run cannot interleave its files

class FolderInUse(Exception):
    """Another live process holds the folder's lock: one line that names it."""


_held = {}  # path -> the open lock file, for the life of the process (one lock per folder)


def lock_folder(folder, name, what, wait=False):
    """Locks <folder>/<name> until release_folder() or the process's end; True if this call
    took it. The kernel drops the lock of a process that dies, even by SIGKILL, so a killed
    run's file never blocks (its pid and host stay in it until the next run writes its own).
    A second process gets FolderInUse naming the holder (wait=True: it waits for it instead).
    POSIX lockf, not flock: a child forked by the pool does not inherit it, so no orphaned
    worker holds it after its parent was killed; NFS honours it. Windows locks one byte past
    the text (msvcrt), so that the holder's line stays readable. A filesystem without locks
    (Lustre mounted without -o flock) runs unlocked, with a warning."""
    path = os.path.join(folder, name)
    if path in _held:  # taken by this process already (the demo's trainer, then fineweb.main)
        return False
    while True:
        f = open(path, "a+")
        try:
            if os.name == "nt":
                import msvcrt
                f.seek(1 << 20)
                msvcrt.locking(f.fileno(), msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.lockf(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            if isinstance(e, (BlockingIOError, PermissionError)):
                raise FolderInUse(f"{folder} is in use by {holder or 'another process'}: {what}") from None
            print(f"warning: cannot lock {path} ({e.strerror or e}): nothing stops a second run "
                  "from using this folder at the same time", file=sys.stderr)
            return False
        try:  # the file we locked is still the one under that name (not one removed meanwhile)
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        f.close()
    import socket
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _held[path] = f
    return True


def release_folder(folder, name):
    """Removes the lock file (while still locked: a process waiting on it sees that and takes a
    new one) and drops the lock."""
    f = _held.pop(os.path.join(folder, name), None)
    if f is not None:
        with contextlib.suppress(OSError):  # Windows: an open file cannot be removed
            os.remove(f.name)
        f.close()


# -----------------------------------------------------------------------------
# The pipeline: documents -> one token stream -> shards of shard_size


def write_shards(batches, out, manifest, spec, shard_size, max_tokens, num_proc):
    """Tokenizes the batches in a process pool and cuts the stream into shards; returns the tokens."""
    from multiprocessing.pool import Pool

    from tqdm import tqdm

    class KillingPool(Pool):  # terminate() kills the workers with SIGKILL: they ignore SIGTERM
        @staticmethod
        def Process(ctx, *args, **kwds):
            process = ctx.Process(*args, **kwds)
            process.terminate = process.kill
            return process

    S, shards = shard_size, manifest["shards"]
    save_manifest(os.path.join(out, "manifest.json"), manifest)  # before shard 0: never an orphan shard
    index, total = len(shards), sum(s["tokens"] for s in shards)
    doc, offset = (shards[-1]["next_doc"], shards[-1]["next_offset"]) if shards else (0, 0)
    skipped = manifest.get("skipped_docs", 0) if shards else 0  # rows without text before `doc`
    stop = (doc, offset, skipped)  # where the stream has got to: document, token in it, rows skipped
    limit = max_tokens or float("inf")
    buf, fill = np.empty(S, dtype=np.uint16), 0  # the only big allocation: memory stays flat
    bar = tqdm(total=max_tokens, initial=total, unit="tokens", unit_scale=True,
               desc=f"tokenizing {shard_filename(split_of(index), index)}",
               bar_format=None if max_tokens else "{desc}: {n_fmt}tokens [{elapsed}, {rate_fmt}]")

    def finish_shard(n, last):
        nonlocal index
        name = shard_filename(split_of(index), index)
        write_shard(os.path.join(out, name), buf[:n])
        shards.append({"file": name, "tokens": n, "next_doc": stop[0], "next_offset": stop[1]})
        manifest.update(done=last, skipped_docs=stop[2])
        save_manifest(os.path.join(out, "manifest.json"), manifest)  # after the shard, never ahead
        index += 1
        if not last:
            bar.set_description(f"tokenizing {shard_filename(split_of(index), index)}")

    threads = max(1, min(8, (os.cpu_count() or 1) // num_proc))  # the cores the pool leaves over
    with bar, KillingPool(num_proc, initializer=init_worker, initargs=(spec, threads)) as pool:
        # imap keeps document order; the pipe to the workers holds only a few tasks at a time
        for tokens, lengths in pool.imap(tokenize_batch, batches):
            ends = np.cumsum(lengths)  # where each document ends inside `tokens`
            gaps = np.cumsum(lengths == 0)  # skipped rows (length 0) up to each document
            pos, offset = offset, 0  # only the first document after a resume starts part-way
            while pos < len(tokens) and total < limit:
                take = int(min(S - fill, len(tokens) - pos, limit - total))
                buf[fill:fill + take] = tokens[pos:pos + take]
                fill, pos, total = fill + take, pos + take, total + take
                bar.update(take)
                # documents of this batch now done, with the skipped rows right after them
                d = int(np.searchsorted(ends, pos, side="right"))
                stop = (doc + d, pos - (int(ends[d - 1]) if d else 0),
                        skipped + (int(gaps[d - 1]) if d else 0))
                if fill == S:
                    finish_shard(S, last=False)
                    fill = 0
            if pos == len(tokens):  # all of the batch is in (also one of skipped rows only)
                stop = (doc + len(lengths), 0, skipped + int(gaps[-1]))
            doc, skipped = doc + len(lengths), skipped + int(gaps[-1])
            if total >= limit:
                break
        if fill:
            finish_shard(fill, last=True)  # the last shard is partial
    if not manifest["done"]:  # the stream ended on a shard boundary
        manifest.update(done=True, skipped_docs=stop[2])
        save_manifest(os.path.join(out, "manifest.json"), manifest)
    return total


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Inside, SIGTERM raises KeyboardInterrupt: kill, timeout or a batch scheduler stop the run
    as Ctrl-C does (the pool is terminated, the finished shards kept); a second SIGTERM kills."""
    if threading.current_thread() is not threading.main_thread():  # only it can handle signals
        yield
        return
    pid = os.getpid()

    def on_sigterm(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        if os.getpid() != pid:  # a pool worker, forked before init_worker replaced this handler
            os.kill(os.getpid(), signum)  # dies quietly
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -----------------------------------------------------------------------------
# The command line. The parser and flag types here serve every script of the project: this
# file imports neither torch nor the trainer, so the trainer and the tools import them from here.

class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors, and no prefix matching (--max_step is not --max_steps)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind, low):
    """An argparse type: a finite int or float, at least `low`."""
    def read(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {text}")
        return value
    read.__name__ = kind.__name__  # argparse names the type in its messages
    return read


def one_of(*choices):
    def read(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text
    return read


def str2bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0/true/false, got {s!r}")


ENVIRONMENT = """\
environment variables:
  HF_DATASETS_CACHE   the datasets cache: the downloaded corpus, and --data_files converted to
                      Arrow (default: $HF_HOME/datasets)
  HF_HOME             root of the Hugging Face caches (default: ~/.cache/huggingface)
  HF_HUB_OFFLINE      1: never contact the hub (--data_files, or a corpus already in the cache)
  HF_ENDPOINT         a Hugging Face mirror to download from (e.g. https://hf-mirror.com)
"""


def parse_args(argv):
    p = OneLineParser(prog="fineweb.py", description=__doc__, epilog=ENVIRONMENT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_dir", default=LOCAL_DIR,
                   help="output folder of the shards and manifest.json (default: %(default)s)")
    p.add_argument("--shard_size", type=int, default=SHARD_SIZE,
                   help="tokens per shard (default: %(default)s)")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="tokenizer processes (default: %(default)s: half the cores, as in the reference)")
    p.add_argument("--data_files", nargs="+",
                   help="local parquet/jsonl/json/txt files or globs, read instead of the hub; an "
                        "existing name is taken literally (default: none: FineWeb-Edu from the hub)")
    p.add_argument("--max_tokens", type=int,
                   help="stop after this many tokens; the hub is then streamed, not downloaded "
                        "(default: none: the whole corpus)")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False, metavar="0|1",
                   help="1 (or the bare flag): delete this folder's shards and manifest, start over "
                        "(default: 0)")
    args = p.parse_args(argv)
    # the ranges, in one place, before anything is read or written (argparse checks only types)
    for flag, value in (("--shard_size", args.shard_size), ("--num_proc", args.num_proc),
                        ("--max_tokens", args.max_tokens)):
        if value is not None and value < 1:
            fail(f"{flag} must be >= 1{' or omitted' * (flag == '--max_tokens')}, not {value}")
    return args


def skipped_note(manifest):
    n = manifest.get("skipped_docs", 0)
    return f"; skipped {n:,} rows whose text is null, missing or not a string" if n else ""


def main(argv=None):
    args = parse_args(argv)
    files, builder = find_data_files(args.data_files) if args.data_files else ([], None)
    out = make_folder(args.local_dir)
    try:
        locked = lock_folder(out, LOCK, "another fineweb.py is writing shards there; wait for it, or stop it")
    except FolderInUse as e:
        fail(e)
    try:
        return write_folder(args, files, builder, out)
    finally:
        if locked:
            release_folder(out, LOCK)


def write_folder(args, files, builder, out):
    """main()'s work, under the folder's lock."""
    identity = {"source": {"data_files": files} if files else {"dataset": DATASET, "config": CONFIG},
                "shard_size": args.shard_size, "max_tokens": args.max_tokens}
    manifest = check_folder(out, identity, args.overwrite)
    shards = manifest["shards"]
    before = sum(s["tokens"] for s in shards)
    if manifest["done"]:
        print(f"already done: {len(shards)} shards, {before:,} tokens in {out}{skipped_note(manifest)} "
              "(--overwrite redoes it)")
        return 0

    try:  # before the corpus, whose download or conversion can take minutes
        spec = gpt2_spec()
    except AssetError as e:
        fail(e)
    t0 = time.time()
    with sigterm_as_ctrl_c():
        try:
            ds = load_corpus(files, builder, streaming=args.max_tokens is not None)
            # resume: skip the documents that earlier shards consumed (write_shards cuts the next one)
            batches = text_batches(ds, skip_docs=shards[-1]["next_doc"] if shards else 0)
            # the first batch is read here, not in the pool's feeder thread, so a bad corpus fails cleanly
            first = next(batches, None)
            batches = itertools.chain([first], batches) if first is not None else iter(())
            total = write_shards(batches, out, manifest, spec, args.shard_size, args.max_tokens,
                                 args.num_proc)
        except TokenRangeError as e:
            fail(e)
        except UnicodeDecodeError as e:  # a damaged text or jsonl file
            fail(f"cannot read --data_files {', '.join(files)}: not UTF-8 text ({e.reason} at byte {e.start})")
        except OSError as e:
            if e.filename and os.path.dirname(os.path.abspath(e.filename)) == out:  # disk full, ...
                import shutil
                fail(f"cannot write {e.filename} ({e.strerror or e}; a shard needs up to "
                     f"{format_bytes(2 * args.shard_size + 128)}, {format_bytes(shutil.disk_usage(out).free)} "
                     "are free); the shards finished before it are intact: make room and rerun the "
                     "same command to continue after them")
            fail(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}; "  # network gone mid-stream
                 "rerun the same command to continue after the last finished shard")
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM
            fail("interrupted; rerun the same command to continue after the last finished shard")
    dt = time.time() - t0
    print(f"wrote {len(shards)} shards, {total:,} tokens in {out} in {dt:.1f}s "
          f"({(total - before) / dt:,.0f} tokens/s){skipped_note(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
