"""fineweb.py on a small local corpus with the real GPT-2 tokenizer, checked against a naive reference.

The corpus is a few hundred documents cut from tiny shakespeare (plus an empty one, a non-ASCII one,
one that contains the literal text "<|endoftext|>" and one longer than three shards), written as
jsonl and as parquet. Shards are small (7,000 tokens) so that a run makes about ten of them.
"""
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fineweb

REPO = Path(__file__).resolve().parent.parent
EOT = 50256
S = 7000  # shard size of every test


# -----------------------------------------------------------------------------
# the corpus, the reference and helpers


def make_docs(text):
    paras = [p for p in text.split("\n\n") if p.strip()]
    docs, i, k = [], 0, 0
    while len(docs) < 300:
        n = k % 7 + 1  # 1..7 paragraphs: documents of many lengths
        docs.append("\n\n".join(paras[i:i + n]))
        i, k = i + n, k + 1
    docs[5] = ""  # an empty document is just its EOT
    docs[17] = "Naïve café ✨ 日本語 — “quotes”\n"
    docs[40] = "a literal <|endoftext|> is ordinary text, not the EOT token"
    docs[100] = "\n\n".join(paras[2000:2400])  # 23k tokens: across four shards
    return docs


_CORPUS = {}


@pytest.fixture
def corpus(tiktoken_cache, shakespeare_file, tmp_path_factory, monkeypatch):
    """(docs, jsonl path, parquet path), written once per session; datasets' cache in a tmp folder."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not _CORPUS:
        root = tmp_path_factory.mktemp("corpus")
        docs = make_docs(Path(shakespeare_file).read_text())
        with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write(json.dumps({"id": i, "text": d, "url": f"https://example.com/{i}"}) + "\n")
        table = pa.table({"id": list(range(len(docs))), "text": docs})
        pq.write_table(table, root / "docs.parquet", row_group_size=64)
        _CORPUS.update(docs=docs, jsonl=str(root / "docs.jsonl"), parquet=str(root / "docs.parquet"),
                       cache=str(root / "hf_datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(_CORPUS["cache"]))
    monkeypatch.setenv("HF_DATASETS_CACHE", _CORPUS["cache"])  # for subprocesses
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return _CORPUS["docs"], _CORPUS["jsonl"], _CORPUS["parquet"]


def reference_shards(docs, shard_size, max_tokens=None):
    """The SPEC's algorithm, naively: one stream of [EOT] + tokens per document, cut every shard_size."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    stream = []
    for d in docs:
        stream += [EOT] + enc.encode_ordinary(d)
    stream = stream[:max_tokens]
    cuts = range(0, len(stream), shard_size)
    shards = [np.array(stream[i:i + shard_size], dtype=np.uint16) for i in cuts]
    names = [fineweb.shard_filename("val" if i == 0 else "train", i) for i in range(len(shards))]
    return {name: npy_bytes(a) for name, a in zip(names, shards)}


def npy_bytes(a):
    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def shard_files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("edufineweb_*.npy"))}


def cli(*args):
    return [str(a) for a in args]


def run_cli(*args, prelude=""):
    """python fineweb.py ARGS in a subprocess (prelude: Python run first, e.g. to plant a kill)."""
    code = f"import sys, fineweb\n{prelude}\nsys.exit(fineweb.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *cli(*args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# -----------------------------------------------------------------------------
# the module itself


def test_import_is_cheap_and_names_are_exported():
    code = ("import sys, fineweb; heavy = {'datasets', 'tiktoken', 'tqdm', 'torch'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert fineweb.LOCAL_DIR == str(REPO / "edu_fineweb10B")
    assert fineweb.shard_filename("val", 0) == "edufineweb_val_000000.npy"
    assert fineweb.shard_filename("train", 12) == "edufineweb_train_000012.npy"


def test_token_that_does_not_fit_uint16_is_an_error(monkeypatch, tiktoken_cache):
    class Enc:
        def encode_to_numpy(self, text, disallowed_special):
            return np.array([70000], dtype=np.uint32)

    monkeypatch.setattr(fineweb._local, "enc", Enc(), raising=False)  # a worker thread's encoder
    with pytest.raises(fineweb.TokenRangeError, match="70000"):
        fineweb._encode(["x"])


# -----------------------------------------------------------------------------
# the shards


def test_shards_equal_the_reference(corpus, tmp_path, monkeypatch):
    docs, jsonl, parquet = corpus
    monkeypatch.setattr(fineweb, "DOCS_PER_TASK", 37)  # many pool tasks, boundaries everywhere
    ref = reference_shards(docs, S)
    runs = {"jsonl-1": (jsonl, 1), "jsonl-2": (jsonl, 2), "parquet-2": (parquet, 2)}
    for name, (path, num_proc) in runs.items():
        out = tmp_path / name
        assert fineweb.main(cli("--data_files", path, "--local_dir", out, "--shard_size", S,
                                 "--num_proc", num_proc)) == 0
        assert shard_files(out) == ref, name  # byte for byte, .npy header included
        assert not list(out.glob("*.tmp"))

    # what those bytes mean: names and splits, 1-D uint16, all full but the last, EOT per document
    names = list(ref)
    assert len(names) >= 8 and names[0] == "edufineweb_val_000000.npy"
    assert all(n.startswith("edufineweb_train_") for n in names[1:])
    arrays = [np.load(tmp_path / "jsonl-1" / n) for n in names]
    assert all(a.dtype == np.uint16 and a.ndim == 1 for a in arrays)
    assert [len(a) for a in arrays[:-1]] == [S] * (len(arrays) - 1) and 0 < len(arrays[-1]) <= S
    stream = np.concatenate(arrays)
    assert stream[0] == EOT and (stream == EOT).sum() == len(docs)
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    starts = np.flatnonzero(stream == EOT).tolist() + [len(stream)]
    decoded = [enc.decode(stream[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
    assert decoded == docs


def test_max_tokens_stops_there(corpus, tmp_path):
    docs, jsonl, _ = corpus
    n = 3 * S + 1234
    assert fineweb.main(cli("--data_files", jsonl, "--local_dir", tmp_path, "--shard_size", S,
                             "--max_tokens", n, "--num_proc", 1)) == 0
    files = shard_files(tmp_path)
    assert files == reference_shards(docs, S, max_tokens=n)
    assert sum(len(np.load(tmp_path / f)) for f in files) == n


def test_interrupted_sample_resumes(corpus, tmp_path, monkeypatch):
    # --max_tokens streams the corpus (as from the hub), so a rerun skips documents in the stream
    docs, jsonl, _ = corpus
    n = 5 * S + 99
    args = cli("--data_files", jsonl, "--local_dir", tmp_path, "--shard_size", S, "--max_tokens", n,
               "--num_proc", 2)
    real_write, calls = fineweb.write_shard, []

    def ctrl_c_at_third_shard(path, tokens):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(path, tokens)

    monkeypatch.setattr(fineweb, "write_shard", ctrl_c_at_third_shard)
    with pytest.raises(SystemExit, match="interrupted"):
        fineweb.main(args)
    assert len(shard_files(tmp_path)) == 2
    monkeypatch.setattr(fineweb, "write_shard", real_write)
    assert fineweb.main(args) == 0
    assert shard_files(tmp_path) == reference_shards(docs, S, max_tokens=n)


def test_rerun_is_done_other_inputs_refused_overwrite_starts_over(corpus, tmp_path, capsys):
    docs, jsonl, parquet = corpus
    args = cli("--data_files", jsonl, "--local_dir", tmp_path, "--shard_size", S, "--num_proc", 1)
    assert fineweb.main(args) == 0
    before = shard_files(tmp_path)
    capsys.readouterr()
    assert fineweb.main(args) == 0
    assert "already done" in capsys.readouterr().out
    assert shard_files(tmp_path) == before

    for other in (["--shard_size", S + 1], ["--data_files", parquet]):
        with pytest.raises(SystemExit) as e:
            fineweb.main(args + cli(*other))
        assert isinstance(e.value.code, str) and "\n" not in e.value.code and "--overwrite" in e.value.code
    assert fineweb.main(args + cli("--shard_size", 2 * S, "--overwrite")) == 0
    assert shard_files(tmp_path) == reference_shards(docs, 2 * S)


# Kill the process for real (SIGKILL, no cleanup) at two moments: right after the first shard was
# renamed into place but before the manifest recorded it, and in the middle of the third shard's
# write (its .tmp on disk, not yet renamed). A rerun must end with the bytes of one clean run.
KILL = """
import os, signal
real_replace, count = os.replace, [0]
def replace(src, dst):
    count[0] += str(dst).endswith(".npy")
    if count[0] == AT and MODE == "before_rename":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
    if count[0] == AT and MODE == "after_rename":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
@pytest.mark.parametrize("mode, at", [("after_rename", 1), ("before_rename", 3)])
def test_killed_run_resumes_to_identical_files(corpus, tmp_path, mode, at):
    docs, jsonl, _ = corpus
    args = ["--data_files", jsonl, "--local_dir", tmp_path, "--shard_size", S, "--num_proc", 2]
    killed = run_cli(*args, prelude=f"MODE, AT = {mode!r}, {at}\n{KILL}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ref = reference_shards(docs, S)
    left = shard_files(tmp_path)
    assert len(left) == (at if mode == "after_rename" else at - 1)
    assert all(left[name] == ref[name] for name in left)  # complete files only, never a truncated one
    recorded = json.loads((tmp_path / "manifest.json").read_text())["shards"]
    assert len(recorded) == at - 1
    assert bool(list(tmp_path.glob("*.tmp"))) == (mode == "before_rename")
    stamps = {s["file"]: (tmp_path / s["file"]).stat().st_mtime_ns for s in recorded}

    # the rerun starts its workers the macOS/Windows way: all they need must be importable, picklable
    rerun = run_cli(*args, prelude="import multiprocessing; multiprocessing.set_start_method('spawn')")
    assert rerun.returncode == 0, rerun.stderr
    assert shard_files(tmp_path) == ref
    assert not list(tmp_path.glob("*.tmp"))
    # it continued: the shards the manifest had recorded were not written again
    assert stamps == {name: (tmp_path / name).stat().st_mtime_ns for name in stamps}


# -----------------------------------------------------------------------------
# errors a user can act on: one line on stderr, non-zero exit, no traceback


def one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_pattern_that_matches_nothing(tmp_path):
    pattern = str(tmp_path / "nope" / "*.parquet")
    one_line_error(run_cli("--data_files", pattern, "--local_dir", tmp_path / "out"), pattern)


def test_file_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1, 2], "content": ["a", "b"]}), path)
    result = run_cli("--data_files", path, "--local_dir", tmp_path / "out")
    one_line_error(result, "bad.parquet", "id", "content")


def test_no_network_for_the_hub(monkeypatch, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub")  # what datasets says

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as e:
        fineweb.main(cli("--local_dir", tmp_path, "--max_tokens", 1000))
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message and "--data_files" in message
