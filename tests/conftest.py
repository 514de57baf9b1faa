"""Shared fixtures and helpers of the test suite (test modules never import each other).

The tests need no network and nothing outside the repository: the GPT-2 tokenizer, the HellaSwag
val set and tiny shakespeare ship in assets/. The environment variables that would point the
scripts elsewhere (a user's HELLASWAG_DIR, a tiktoken cache) are cleared for the whole run, so
the suite runs as on a fresh clone.

Tests that start subprocesses or compile are marked `slow`: `pytest -m "not slow"` gives
quick feedback.
"""
import functools
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `import train_gpt2` etc. from any working directory
for _variable in ("HELLASWAG_DIR", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
    os.environ.pop(_variable, None)  # this process and every subprocess: the shipped files only

ASSETS = REPO / "assets"
SHAKESPEARE = ASSETS / "tinyshakespeare" / "input.txt"  # the lecture's input.txt
VOCAB = 512  # the tiny vocabulary of the training tests: their shards hold ids < VOCAB


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts subprocesses or compiles (deselect with "
                                       "-m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped with the reason elsewhere "
                                       "(python -m pytest -m cuda tests)")


# -----------------------------------------------------------------------------
# the oracle of the tokenizer

# the URLs tiktoken's own "gpt2" constructor downloads, and the files in assets/ they hold
OPENAI = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
TIKTOKEN_URLS = {OPENAI + "vocab.bpe": "vocab.bpe", OPENAI + "encoder.json": "encoder.json"}


@pytest.fixture(scope="session")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken.get_encoding("gpt2") itself, built by tiktoken's own code (an independent oracle
    for fineweb.gpt2_encoding): its cache is filled with the shipped files under the names it
    looks for, sha1(url), so it downloads nothing."""
    import hashlib

    import tiktoken
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for url, name in TIKTOKEN_URLS.items():
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes((ASSETS / "gpt2" / name).read_bytes())
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        return tiktoken.get_encoding("gpt2")  # kept by tiktoken for the rest of the process


# -----------------------------------------------------------------------------
# tiny models and data

def tiny_model(seed=0, sharpen=0.0, **kw):
    """A tiny GPT (2 layers, 2 heads, 32 channels, vocab 64, block 32 unless kw says otherwise).
    sharpen > 0 redraws every matrix with that std: attention far from uniform and clearly
    different logits per token, so that a wrong mask, scale or copy shows."""
    import train_gpt2
    torch.manual_seed(seed)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(**(dict(block_size=32, vocab_size=64, n_layer=2,
                                                           n_head=2, n_embd=32) | kw)))
    if sharpen:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, sharpen)
    return model


def random_tokens(shape, vocab, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def make_shards(root, n_train=3, seed=0):
    """A val shard and n_train train shards of random ids < VOCAB, as fineweb.py names them;
    lengths 337, 374, 411: 5, 5 and 6 micro-batches of 2 x 32 tokens, not a multiple of 2."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    np.save(os.path.join(root, "edufineweb_val_000000.npy"), rng.integers(0, VOCAB, 1000, dtype=np.uint16))
    for i in range(1, n_train + 1):
        np.save(os.path.join(root, f"edufineweb_train_{i:06d}.npy"),
                rng.integers(0, VOCAB, 300 + 37 * i, dtype=np.uint16))
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """make_shards() once per test module."""
    return make_shards(tmp_path_factory.mktemp("data"))


def tiny_args(data_root, log_dir, **overrides):
    """train_gpt2.py flags for a tiny run: 2 x 32 tokens per micro-batch, 256 per step
    (4 accumulation steps on 1 process), 8 steps, evaluations at 0, 4, 7, checkpoints
    at 3 and 6, before the last step (7) and after it (8)."""
    args = dict(device="cpu", n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=VOCAB,
                micro_batch_size=2, sequence_length=32, total_batch_size=256, max_steps=8,
                warmup_steps=2, eval_interval=4, val_steps=3, hellaswag=0, sample=0,
                checkpoint_interval=3, data_root=data_root, log_dir=log_dir)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


# -----------------------------------------------------------------------------
# running the scripts as a user would

# A Python prelude that SIGKILLs the process at one moment of an atomic file write (a checkpoint,
# log.txt, a token shard), given by KILL_AT: "after_save:model_00003.pt" (right after that file
# is complete) or "before_rename:model_00006.pt" (written to its temporary name, not yet
# renamed). Under torchrun only rank 0 saves, so rank 0 dies and torchrun takes the others
# down, as when a node is lost.
KILL_PRELUDE = """
import os, signal
when, name = os.environ["KILL_AT"].split(":")
real_replace = os.replace
def replace(src, dst):
    if when == "before_rename" and str(dst).endswith(name):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
    if when == "after_save" and str(dst).endswith(name):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
"""

# A Python prelude that sends the process a SIGTERM (as a scheduler's preemption would) at the
# start of the n-th call of a function, given by SIGTERM_AT: "train_gpt2.get_lr:4" (step 3's
# learning rate), "hellaswag.score:2", optionally ":1" more for rank 1 only.
SIGTERM_PRELUDE = """
import importlib, os, signal
where, n, *rank = os.environ["SIGTERM_AT"].split(":")
module_name, name = where.rsplit(".", 1)
module = importlib.import_module(module_name)
real, calls = getattr(module, name), [0]
def patched(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(n) and rank in ([], [os.environ.get("RANK", "0")]):
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
setattr(module, name, patched)
"""

_PRELUDES = []  # the folder the prelude scripts go to: pytest's temporary folder of this session


@pytest.fixture(scope="session", autouse=True)
def _prelude_folder(tmp_path_factory):
    _PRELUDES[:] = [tmp_path_factory.mktemp("preludes")]


def command(args, torchrun=0, script="train_gpt2.py", prelude=None):
    """The command line of a script: python, or torchrun with `torchrun` CPU processes. With a
    prelude, the script's main() runs after that Python code (e.g. KILL_PRELUDE), from a
    wrapper script in the session's temporary folder. script=None: python with args alone
    (e.g. ["-c", code])."""
    target = [str(REPO / script)] if script else []
    if prelude is not None:
        module = script[:-3]
        # all under the __main__ guard: worker processes that multiprocessing spawns import this file
        body = textwrap.indent(f"{prelude}\nimport {module}\nsys.exit({module}.main())", "    ")
        code = f"import sys\nsys.path.insert(0, {str(REPO)!r})\nif __name__ == '__main__':\n{body}\n"
        wrapper = _PRELUDES[0] / f"prelude_{abs(hash(code))}_{module}.py"
        wrapper.write_text(code)
        target = [str(wrapper)]
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={torchrun}"] + target + args
    return [sys.executable] + target + args


def start(args, torchrun=0, env=None, script="train_gpt2.py", prelude=None, **popen):
    """The script started in a subprocess (see command()), its stdout and stderr piped, one
    thread per process (OMP_NUM_THREADS=1)."""
    return subprocess.Popen(command([str(a) for a in args], torchrun, script, prelude), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), **popen)


def run(args, torchrun=0, env=None, check=True, script="train_gpt2.py", prelude=None, timeout=300):
    """The script run to its end in a subprocess (see start()): a CompletedProcess. check: it
    must exit with 0."""
    proc = start(args, torchrun, env, script, prelude)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


# the step line: "step     3 | loss 6.123456 | lr 3.0000e-04 | norm 1.2345 | dt: ... | eta 1m05s"
STEP_LINE = re.compile(r"^step +(\d+) \| loss (\S+) \| lr (\S+) \| norm (\S+) \| dt: .*\| eta \S+$", re.M)


def step_lines(stdout):
    """[(step, loss, lr)] of the step lines a run printed, in order (loss and lr as printed)."""
    return [(int(s), loss, lr) for s, loss, lr, _ in STEP_LINE.findall(stdout)]


def check_resumed(stdout, step, path=None):
    """The process whose stdout this is resumed at `step` (from `path`, where given), and
    trained no step below it again: its first step line is `step`'s, and they only go up. A run
    that silently started over writes the same log.txt (training is deterministic), so the
    log alone cannot show a resume."""
    found = re.findall(r"^resumed from (.*) at step (\d+)(?: \(loaded in [0-9.]+s\))?$", stdout, re.M)
    assert [int(s) for _, s in found] == [step], found or stdout[-2000:]
    if path is not None:
        assert found[0][0] == str(path), found
    steps = [s for s, _, _ in step_lines(stdout)]
    assert steps and steps[0] == step, steps
    assert steps == sorted(set(steps)), steps  # each step once, in order


def read_log(log_dir):
    """[(step, kind, value)] from log.txt, every line in the lecture's format."""
    with open(os.path.join(log_dir, "log.txt")) as f:
        return [(int(s), k, float(v)) for s, k, v in (line.split() for line in f.read().splitlines())]


def log_text(log_dir):
    with open(os.path.join(log_dir, "log.txt")) as f:
        return f.read()


def read_config(log_dir):
    with open(os.path.join(log_dir, "config.json")) as f:
        return json.load(f)


def checkpoint_names(log_dir):
    return sorted(n for n in os.listdir(log_dir) if n.endswith(".pt"))


def one_line_error(p, *needles, rc=None):
    """A failed run: non-zero exit (or rc), exactly one line on stderr holding every needle,
    and no traceback."""
    assert p.returncode != 0 if rc is None else p.returncode == rc, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -----------------------------------------------------------------------------
# a real HTTP server on 127.0.0.1 (a download's success and failures, a Hugging Face mirror)

class _Files(http.server.BaseHTTPRequestHandler):
    routes, seen = {}, []  # the server's: path -> (status, body, declared length); paths asked for

    def do_GET(self):
        self.seen.append(self.path)
        status, body, length = self.routes.get(self.path, (404, b'{"error": "not here"}', None))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)  # a declared length above len(body): the connection drops early

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """A server with nothing (404 for every path) until serve(path, body, status=200,
    length=None) adds a file; .url, and .seen: the paths asked for, in order. length: the
    Content-Length to declare (more than the body: a download cut short)."""
    handler = type("Files", (_Files,), dict(routes={}, seen=[]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def serve(path, body, status=200, length=None):
        handler.routes[path] = (status, body, length)
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", seen=handler.seen, serve=serve)
    server.shutdown()
    server.server_close()


def free_port():
    """A port on 127.0.0.1 that nothing listens on: free to bind, and a connection to it is
    refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -----------------------------------------------------------------------------
# reading back what --wandb (offline) and --tensorboard wrote

def read_wandb(log_dir):
    """The offline wandb runs that train_gpt2.py wrote in log_dir/wandb, oldest first: dicts of
    id, dir, history ([{key: value}], one row per step) and, once wandb wrote the run's record,
    resumed and config ({key: value}).
    The .wandb file is wandb's transaction log: a 7-byte header (":W&B", magic, version), then
    LevelDB's log format (32 KiB blocks of records, each with a 7-byte header: CRC, length,
    type 1 full, 2 first, 3 middle, 4 last), each record a wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2
    runs = []
    for path in sorted(Path(log_dir, "wandb").glob("offline-run-*/run-*.wandb")):  # by start time
        data, pos, chunk = path.read_bytes(), 7, b""
        run = dict(id=path.stem[len("run-"):], dir=path.parent, history=[])
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header: zeros
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:  # the rest of the file is unwritten
                break
            chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                chunk = b""
                if record.HasField("run"):
                    assert record.run.run_id == run["id"], path
                    run.update(resumed=record.run.resume,
                               config={u.key: json.loads(u.value_json) for u in record.run.config.update})
                elif record.HasField("history"):
                    row = {}
                    for item in record.history.item:  # a value nested in a dict has a key path
                        *outer, key = item.nested_key or [item.key]
                        inner = functools.reduce(lambda d, k: d.setdefault(k, {}), outer, row)
                        inner[key] = json.loads(item.value_json)
                    run["history"].append(row)
        runs.append(run)
    return runs


def wandb_points(runs, key):
    """[(step, value)] of one key in every run's history, in the order written."""
    return [(row["_step"], row[key]) for run in runs for row in run["history"] if key in row]


def read_tensorboard(log_dir, tag):
    """[(step, value)] of a scalar, as TensorBoard shows it (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(log_dir, "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    if tag.endswith("/text_summary"):
        return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
    return [(e.step, e.value) for e in events.Scalars(tag)]


def tiny_checkpoint(path, vocab_size=50257, seed=0, block_size=64):
    """A tiny sharp random GPT saved as the trainer saves its weights; returns (path, model)."""
    import dataclasses

    import fineweb
    model = tiny_model(seed=seed, sharpen=0.3, block_size=block_size, vocab_size=vocab_size)
    checkpoint = {"model": model.state_dict(), "step": 10, "val_loss": 5.0,
                  "config": dataclasses.asdict(model.config)}
    fineweb.write_atomic(str(path), lambda f: torch.save(checkpoint, f))
    return str(path), model.eval()
