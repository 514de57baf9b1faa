"""fineweb.py on a small local corpus with the real GPT-2 tokenizer, checked against a naive reference.

The corpus is a few hundred documents cut from tiny shakespeare (plus an empty one, a non-ASCII one,
one that contains the literal text "<|endoftext|>" and one longer than three shards), written as
jsonl and as parquet; a second version of it has rows whose text is null, missing or not a string
in between, which fineweb.py skips. Shards are small (7,000 tokens) so that a run makes about ten.
Tests that start Python in a subprocess are marked slow.
"""
import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fineweb
from conftest import KILL_PRELUDE, REPO, SHAKESPEARE, one_line_error, run, start

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
def corpus(tmp_path_factory, monkeypatch, tiktoken_gpt2):
    """(docs, jsonl path, parquet path), written once per session; datasets' cache in a tmp folder."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not _CORPUS:
        root = tmp_path_factory.mktemp("corpus")
        text = SHAKESPEARE.read_text()
        docs = make_docs(text)
        with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write(json.dumps({"id": i, "text": d, "url": f"https://example.com/{i}"}) + "\n")
        table = pa.table({"id": list(range(len(docs))), "text": docs})
        pq.write_table(table, root / "docs.parquet", row_group_size=64)
        _CORPUS.update(docs=docs, jsonl=str(root / "docs.jsonl"), parquet=str(root / "docs.parquet"),
                       cache=str(root / "hf_datasets"), root=root, shakespeare=text,
                       tiktoken_gpt2=tiktoken_gpt2)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(_CORPUS["cache"]))
    monkeypatch.setenv("HF_DATASETS_CACHE", _CORPUS["cache"])  # for subprocesses
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return _CORPUS["docs"], _CORPUS["jsonl"], _CORPUS["parquet"]


# what web corpora hold now and then, and what datasets 5's json builder keeps as it is
NOT_TEXT = [None, 123, ["a", "list"], {"a": "dict"}, 1.5, True]


def with_bad_rows(docs):
    """The rows of docs with rows whose text is null, missing or not a string in between: the first
    row, one after every ninth document, a run of 80 (more than two pool tasks of 37) and the end."""
    rows = [{"id": "first", "url": "no text key"}]
    for i, d in enumerate(docs):
        rows.append({"id": i, "text": d})
        if i % 9 == 4:
            rows.append({"id": f"bad-{i}", "text": NOT_TEXT[i % len(NOT_TEXT)]})
        if i == 150:
            rows += [{"id": f"null-{k}", "text": None} for k in range(80)]
    return rows + [{"id": "last", "text": None}] * 3


@pytest.fixture
def bad_corpus(corpus):
    """(docs, number of bad rows, jsonl path, parquet path): the corpus with bad rows (in parquet,
    whose column has one type, they are all nulls); the shards must be those of docs alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if "bad_jsonl" not in _CORPUS:
        root, rows = _CORPUS["root"], with_bad_rows(corpus[0])
        with open(root / "bad.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        texts = [r["text"] if isinstance(r.get("text"), str) else None for r in rows]
        pq.write_table(pa.table({"text": texts}), root / "bad.parquet", row_group_size=64)
        bad = sum(t is None for t in texts)
        _CORPUS.update(bad=bad, bad_jsonl=str(root / "bad.jsonl"), bad_parquet=str(root / "bad.parquet"))
    return corpus[0], _CORPUS["bad"], _CORPUS["bad_jsonl"], _CORPUS["bad_parquet"]


@pytest.fixture
def long_corpus(corpus):
    """(jsonl path, shards of an uninterrupted run): all of tiny shakespeare, ~3,000-character
    documents, 49 shards of S tokens."""
    if "long_jsonl" not in _CORPUS:
        root, docs, cur = _CORPUS["root"], [], []
        for para in _CORPUS["shakespeare"].split("\n\n"):
            cur.append(para)
            if sum(map(len, cur)) >= 3000:
                docs.append("\n\n".join(cur))
                cur = []
        docs.append("\n\n".join(cur))
        with open(root / "long.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        assert fineweb.main(cli("--data_files", root / "long.jsonl", "--local_dir", root / "long",
                                "--shard_size", S, "--num_proc", 2)) == 0
        _CORPUS.update(long_jsonl=str(root / "long.jsonl"), long_shards=shard_files(root / "long"))
    return _CORPUS["long_jsonl"], _CORPUS["long_shards"]


def reference_shards(docs, shard_size, max_tokens=None):
    """The reference's algorithm, naively: one stream of [EOT] + tokens per document (tokenized by
    tiktoken's own "gpt2", which the corpus fixture builds), cut every shard_size."""
    enc = _CORPUS["tiktoken_gpt2"]
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


def error_of(*args):
    """fineweb.main(ARGS)'s error: one line (SystemExit with a message: exit status 1)."""
    with pytest.raises(SystemExit) as e:
        fineweb.main(cli(*args))
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message and message.startswith("fineweb.py: error: ")
    return message


def run_cli(*args, prelude=None, env=None):
    """python fineweb.py ARGS in a subprocess (prelude: Python run first, e.g. to plant a kill)."""
    return run(cli(*args), script="fineweb.py", prelude=prelude, env=env, check=False, timeout=120)


# -----------------------------------------------------------------------------
# the module itself


def test_names_are_exported():  # that importing it is cheap: test_layout.py
    assert fineweb.LOCAL_DIR == str(REPO / "edu_fineweb10B")
    assert fineweb.shard_filename("val", 0) == "edufineweb_val_000000.npy"
    assert fineweb.shard_filename("train", 12) == "edufineweb_train_000012.npy"


def test_token_that_does_not_fit_uint16_is_an_error(monkeypatch):
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
    enc = _CORPUS["tiktoken_gpt2"]
    starts = np.flatnonzero(stream == EOT).tolist() + [len(stream)]
    decoded = [enc.decode(stream[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
    assert decoded == docs


def test_a_corpus_that_ends_on_a_shard_boundary(corpus, tmp_path, capsys):
    """The stream fills its last shard exactly: no empty shard after it, the manifest says done,
    and a rerun has nothing to do."""
    enc = _CORPUS["tiktoken_gpt2"]
    lengths = [1 + len(enc.encode_ordinary(d)) for d in corpus[0]]  # EOT + tokens per document
    n = next(n for n in range(12, 40) if sum(lengths[:n]) % 2 == 0)  # the first n docs: 2 full shards
    docs, length = corpus[0][:n], sum(lengths[:n])
    size = length // 2
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    args = cli("--data_files", jsonl, "--local_dir", tmp_path / "out", "--shard_size", size, "--num_proc", 1)
    assert fineweb.main(args) == 0
    ref = reference_shards(docs, size)
    assert shard_files(tmp_path / "out") == ref and len(ref) == 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["done"]
    capsys.readouterr()
    assert fineweb.main(args) == 0
    assert capsys.readouterr().out.startswith(f"already done: {len(ref)} shards, {length:,} tokens")


def test_txt_files_are_one_document_each(corpus, tmp_path):
    """.txt inputs (datasets' text builder, a whole file per document), in the sorted order of
    the glob's matches."""
    docs = corpus[0][:40]
    (tmp_path / "b.txt").write_text("\n\n".join(docs[20:]), encoding="utf-8")
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:20]), encoding="utf-8")
    assert fineweb.main(cli("--data_files", tmp_path / "*.txt", "--local_dir", tmp_path / "out",
                            "--shard_size", S, "--num_proc", 1)) == 0
    assert shard_files(tmp_path / "out") == reference_shards(["\n\n".join(docs[:20]), "\n\n".join(docs[20:])], S)


def test_max_tokens_stops_there(corpus, tmp_path, capsys):
    docs, jsonl, _ = corpus
    n = 3 * S + 1234
    assert fineweb.main(cli("--data_files", jsonl, "--local_dir", tmp_path, "--shard_size", S,
                             "--max_tokens", n, "--num_proc", 1)) == 0
    files = shard_files(tmp_path)
    assert files == reference_shards(docs, S, max_tokens=n)
    assert sum(len(np.load(tmp_path / f)) for f in files) == n

    # the progress bar says what it does and which shard it fills, from its first line on
    bars = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if "tokens/s" in line]
    assert bars[0].startswith("tokenizing edufineweb_val_000000.npy: "), bars[0]
    assert all(re.match(r"tokenizing edufineweb_(val|train)_\d{6}\.npy: ", b) for b in bars)
    assert {b.split(":")[0] for b in bars} == {f"tokenizing {name}" for name in files}


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


def test_rows_without_text_are_skipped(bad_corpus, tmp_path, monkeypatch, capsys):
    docs, bad, jsonl, parquet = bad_corpus
    monkeypatch.setattr(fineweb, "DOCS_PER_TASK", 37)  # the run of 80 bad rows fills whole tasks
    ref = reference_shards(docs, S)  # the reference applied to the corpus without the bad rows
    for path in (jsonl, parquet):
        args = cli("--data_files", path, "--local_dir", tmp_path / Path(path).suffix, "--shard_size", S,
                   "--num_proc", 2)
        assert fineweb.main(args) == 0
        assert shard_files(tmp_path / Path(path).suffix) == ref, path
        assert f"skipped {bad:,} rows whose text is null, missing or not a string" in capsys.readouterr().out
        assert json.loads((tmp_path / Path(path).suffix / "manifest.json").read_text())["skipped_docs"] == bad
        assert fineweb.main(args) == 0
        out = capsys.readouterr().out
        assert f"already done: {len(ref)} shards" in out and f"skipped {bad:,} rows" in out

    # streamed (--max_tokens), in one go and interrupted at the third shard: the same files and count
    n = 5 * S + 99
    real_write, calls, counts = fineweb.write_shard, [], []

    def ctrl_c_at_third_shard(path, tokens):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(path, tokens)

    for name in ("one go", "resumed"):
        args = cli("--data_files", jsonl, "--local_dir", tmp_path / name, "--shard_size", S,
                   "--max_tokens", n, "--num_proc", 2)
        if name == "resumed":
            monkeypatch.setattr(fineweb, "write_shard", ctrl_c_at_third_shard)
            with pytest.raises(SystemExit, match="interrupted"):
                fineweb.main(args)
            monkeypatch.setattr(fineweb, "write_shard", real_write)
        assert fineweb.main(args) == 0
        assert shard_files(tmp_path / name) == reference_shards(docs, S, max_tokens=n)
        counts.append(json.loads((tmp_path / name / "manifest.json").read_text())["skipped_docs"])
    assert 0 < counts[0] == counts[1] < bad  # the bad rows before where the sample stopped


def test_paths_are_taken_literally_patterns_are_globs(corpus, tmp_path):
    # [ ] are a glob's character class: an existing file or folder named so is still itself
    docs, jsonl, _ = corpus
    (tmp_path / "data[v2]").mkdir()
    shutil.copy(jsonl, tmp_path / "data[v2]" / "docs[1].jsonl")
    out = tmp_path / "runs" / "lr[3e-4]"
    assert fineweb.main(cli("--data_files", tmp_path / "data[v2]" / "docs[1].jsonl", "--local_dir", out,
                             "--shard_size", S, "--num_proc", 1)) == 0
    assert shard_files(out) == reference_shards(docs, S)
    assert sorted(os.listdir(tmp_path / "runs")) == ["lr[3e-4]"]

    # a pattern that names no file is a glob: its matches in sorted order
    lines = Path(jsonl).read_text().splitlines(keepends=True)
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "part-1.jsonl").write_text("".join(lines[100:]))
    (tmp_path / "parts" / "part-0.jsonl").write_text("".join(lines[:100]))
    assert fineweb.main(cli("--data_files", tmp_path / "parts" / "part-*.jsonl", "--local_dir",
                             tmp_path / "globbed", "--shard_size", S, "--num_proc", 1)) == 0
    assert shard_files(tmp_path / "globbed") == reference_shards(docs, S)


def test_rerun_is_done_other_inputs_refused_overwrite_starts_over(corpus, tmp_path, capsys):
    docs, jsonl, parquet = corpus
    args = cli("--data_files", jsonl, "--local_dir", tmp_path, "--shard_size", S, "--num_proc", 1)
    assert fineweb.main(args) == 0
    before = shard_files(tmp_path)
    capsys.readouterr()
    assert fineweb.main(args) == 0
    assert "already done" in capsys.readouterr().out
    assert shard_files(tmp_path) == before

    for other in (["--shard_size", S + 1], ["--data_files", parquet],
                  ["--shard_size", S + 1, "--overwrite", 0]):
        with pytest.raises(SystemExit) as e:
            fineweb.main(args + cli(*other))
        assert isinstance(e.value.code, str) and "\n" not in e.value.code and "--overwrite" in e.value.code
    assert fineweb.main(args + cli("--shard_size", 2 * S, "--overwrite")) == 0  # the bare flag is 1
    assert shard_files(tmp_path) == reference_shards(docs, 2 * S)
    assert fineweb.main(args + cli("--overwrite", "1")) == 0
    assert shard_files(tmp_path) == before


# Kill the process for real (SIGKILL, no cleanup, conftest.KILL_PRELUDE) at two moments: right
# after the first shard was renamed into place but before the manifest recorded it, and in the
# middle of the third shard's write (its .tmp on disk, not yet renamed). A rerun must end with
# the bytes of one clean run.
@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
@pytest.mark.parametrize("mode, at, rows", [("after_save", 1, "clean"), ("before_rename", 3, "clean"),
                                            ("after_save", 2, "with bad rows")])
def test_killed_run_resumes_to_identical_files(corpus, bad_corpus, tmp_path, mode, at, rows):
    # with bad rows, the manifest's document index counts them: the rerun must skip exactly past them
    docs, jsonl, _ = corpus
    if rows != "clean":
        docs, bad, jsonl, _ = bad_corpus
    args = ["--data_files", jsonl, "--local_dir", tmp_path, "--shard_size", S, "--num_proc", 2]
    shard = fineweb.shard_filename("val" if at == 1 else "train", at - 1)  # the at-th shard written
    killed = run_cli(*args, prelude=KILL_PRELUDE, env={"KILL_AT": f"{mode}:{shard}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ref = reference_shards(docs, S)
    left = shard_files(tmp_path)
    assert len(left) == (at if mode == "after_save" else at - 1)
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
    if rows != "clean":  # the bad rows of both runs, each once
        assert f"skipped {bad:,} rows" in rerun.stdout


# SIGTERM (kill, timeout, a scheduler) to the main process or to the whole process group, and Ctrl-C
# (SIGINT to the group), while the workers tokenize. The workers are slowed down so that the run is
# surely mid-stream when the signal comes, on any machine.
SLOW_WORKERS = """
import signal, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if CI ignores it
fineweb.DOCS_PER_TASK = 8
_encode = fineweb._encode
def slow_encode(texts):
    time.sleep(0.04)
    return _encode(texts)
fineweb._encode = slow_encode
"""


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("signum, group", [(signal.SIGTERM, False), (signal.SIGTERM, True),
                                           (signal.SIGINT, True)], ids=["kill", "killpg", "ctrl-c"])
def test_sigterm_or_ctrl_c_stops_in_one_line_and_the_rerun_continues(long_corpus, tmp_path, signum, group):
    jsonl, ref = long_corpus
    args = cli("--data_files", jsonl, "--local_dir", tmp_path, "--shard_size", S, "--num_proc", 2)
    env = dict(TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")  # stderr: ours only
    p = start(args, script="fineweb.py", prelude="import fineweb\n" + SLOW_WORKERS, env=env,
              start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "edufineweb_val_000000.npy").exists() and p.poll() is None:
            assert time.time() < deadline
            time.sleep(0.005)
        (os.killpg if group else os.kill)(p.pid, signum)
        _, err = p.communicate(timeout=30)  # a pool that waits for a dead worker's lock: a timeout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert err == ("fineweb.py: error: interrupted; rerun the same command to continue after the last "
                   "finished shard\n")
    with pytest.raises(ProcessLookupError):  # no worker outlived it
        os.killpg(p.pid, 0)
    # stopped mid-stream (perhaps between a shard's rename and the manifest's record of it)
    assert not json.loads((tmp_path / "manifest.json").read_text())["done"]
    assert not list(tmp_path.glob("*.tmp"))
    left = shard_files(tmp_path)
    assert 1 <= len(left) < len(ref) and all(data == ref[name] for name, data in left.items())

    assert fineweb.main(args) == 0
    assert shard_files(tmp_path) == ref


# -----------------------------------------------------------------------------
# errors a user can act on: one line on stderr, non-zero exit, no traceback


@pytest.mark.slow
def test_pattern_that_matches_nothing(tmp_path):
    pattern = str(tmp_path / "nope" / "*.parquet")
    one_line_error(run_cli("--data_files", pattern, "--local_dir", tmp_path / "out"), pattern)


@pytest.mark.slow
def test_file_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1, 2], "content": ["a", "b"]}), path)
    result = run_cli("--data_files", path, "--local_dir", tmp_path / "out")
    one_line_error(result, "bad.parquet", "id", "content")


def test_help_shows_every_default_and_the_environment(capsys):
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options, environment = text.split("environment variables:")
    entries = re.split(r"\n  (?=--)", options.split("--help")[-1])[1:]  # one per option, after -h
    helps = {entry.split()[0]: " ".join(entry.split()) for entry in entries}
    assert set(helps) == {"--local_dir", "--shard_size", "--num_proc", "--data_files", "--max_tokens",
                          "--overwrite"}
    assert all("(default: " in h for h in helps.values()), helps
    assert "(default: 100000000)" in helps["--shard_size"] and "(default: 0)" in helps["--overwrite"]
    for name in ("HF_ENDPOINT", "HF_DATASETS_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        assert name in environment

    # --overwrite: the bare flag, or 1/0 like train_gpt2.py's booleans
    for argv, want in [([], False), (["--overwrite"], True), (["--overwrite", "1"], True),
                       (["--overwrite", "0"], False), (["--overwrite", "yes"], True),
                       (["--overwrite", "False"], False), (["--overwrite", "--num_proc", "1"], True)]:
        assert fineweb.parse_args(argv).overwrite is want, argv


def test_local_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert "is a file" in error_of("--local_dir", tmp_path / "file", "--max_tokens", 10)
    assert "cannot write to --local_dir" in error_of("--local_dir", tmp_path / "file" / "sub")


# root ignores file permissions (CAP_DAC_OVERRIDE): drop that capability for the run, so that
# the test means the same for root (CI's containers) as for any other user
AS_PLAIN_USER = (["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search"]
                 if os.name != "nt" and os.geteuid() == 0 and shutil.which("setpriv") else [])


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_local_dir_without_write_permission(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        for out in (folder, folder / "sub"):  # the folder itself, or one to create in it
            code = "import sys, fineweb\nsys.exit(fineweb.main(sys.argv[1:]))"
            result = subprocess.run(AS_PLAIN_USER + [sys.executable, "-c", code, "--local_dir", str(out),
                                                     "--max_tokens", "10"],
                                    cwd=REPO, capture_output=True, text=True, timeout=120)
            one_line_error(result, f"cannot write to --local_dir {out} (Permission denied)")
    finally:
        folder.chmod(0o700)


def test_old_tiktoken_or_datasets_is_one_clear_line(tmp_path, monkeypatch):
    import datasets
    import tiktoken

    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    args = ("--data_files", tmp_path / "d.jsonl", "--local_dir", tmp_path / "out")
    with monkeypatch.context() as m:
        m.delattr(tiktoken.Encoding, "encode_to_numpy")  # tiktoken < 0.9
        assert "needs tiktoken >= 0.9.0" in error_of(*args)
    with monkeypatch.context() as m:
        m.delattr(datasets.Dataset, "skip")  # datasets < 2.19
        assert "needs datasets >= 2.19.0" in error_of(*args)


def test_write_atomic_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    for error in (KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")):
        def half_then_error(f):
            f.write(b"half of the new")
            raise error

        with pytest.raises(type(error)) as e:
            fineweb.write_atomic(str(path), half_then_error)
        assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]
    assert e.value.filename == str(path)  # a failed write() names no file: write_atomic names it
    assert str(e.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{path}'"

    class DownloadError(OSError):  # as requests' exceptions: an OSError, but of no file
        pass

    def download_fails(f):
        raise DownloadError("connection reset")

    with pytest.raises(DownloadError) as e:  # left as it is
        fineweb.write_atomic(path, download_fails)
    assert str(e.value) == "connection reset" and e.value.filename is None
    fineweb.write_atomic(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["file.bin"]
