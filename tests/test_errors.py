"""Bad inputs, table-driven: every script, every class of mistake a user can make, and the
only home of these cases. Each asserts a non-zero exit (argparse's 2 for what the command line
alone rules out, our 1 for the rest), exactly one line on stderr holding the key phrase of the
right message, and no traceback. Some messages must also keep a dangerous hint out (torch's
"weights_only=False", numpy's "allow_pickle"). The cases that the command line alone decides
call the script's main(argv) in this process (importing torch once, not per case); the rest,
and a few smoke rows of the first kind, run the script as a subprocess, as a user would."""
import importlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (VOCAB, make_shards, one_line_error, run, tiny_args,
                      tiny_checkpoint)

import train_gpt2


class Foreign:
    """Not ours: a pickle of it must never be unpickled by the scripts."""

    def __init__(self):
        self.payload = [1, 2, 3]


# -----------------------------------------------------------------------------
# the files the cases point at, built once

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    f = {}
    f["data"] = make_shards(root / "data")  # val + 3 train shards, ids < 512
    f["data1"] = make_shards(root / "data1", n_train=1)  # fewer shards than the run was trained on
    # a train shard that is a pickled object array (np.load would need allow_pickle=True)
    pickled = root / "pickled_data"
    pickled.mkdir()
    shutil.copy(os.path.join(f["data"], "edufineweb_val_000000.npy"), pickled)
    np.save(pickled / "edufineweb_train_000001.npy", np.array([{"evil": 1}] * 400, dtype=object),
            allow_pickle=True)
    f["pickled_data"] = str(pickled)

    # a full training checkpoint: 8 steps write model_00003/6/7/8.pt
    run_dir = str(root / "run")
    assert train_gpt2.main(tiny_args(f["data"], run_dir)) == 0
    f["full"] = os.path.join(run_dir, "model_00003.pt")
    full = torch.load(f["full"], weights_only=True)
    assert full["loader"]["shard"] >= 1, full["loader"]  # past data1's single train shard
    # the same checkpoint, its weights not those of its config (wte cut to 500 rows)
    full["model"]["transformer.wte.weight"] = full["model"]["transformer.wte.weight"][:500].clone()
    f["full_misfit"] = str(root / "full_misfit.pt")
    torch.save(full, f["full_misfit"])

    # weights only (no optimizer, loader, RNG), the tiny run's shape
    f["weights"], _ = tiny_checkpoint(root / "weights.pt", vocab_size=VOCAB, block_size=64)
    # GPT-2's vocabulary, a context of 16: too short for sampling's 32 tokens or HellaSwag
    f["short"], _ = tiny_checkpoint(root / "short.pt", vocab_size=50257, block_size=16)
    # weights that do not fit the config that comes with them (wpe has 64 rows, config says 32)
    path, _ = tiny_checkpoint(root / "misfit.pt", vocab_size=50257, block_size=64)
    misfit = torch.load(path, weights_only=True)
    misfit["config"]["block_size"] = 32
    torch.save(misfit, path)
    f["misfit"] = path
    # a foreign pickle: torch.save of an instance of a custom class
    f["foreign"] = str(root / "foreign.pt")
    torch.save(Foreign(), f["foreign"])

    # a log folder holding (the name of) a checkpoint: a fresh start there must refuse
    occupied = root / "occupied"
    occupied.mkdir()
    shutil.copy(f["weights"], occupied / "model_00005.pt")
    f["occupied"] = str(occupied)
    # a log folder whose every checkpoint is damaged: one cut short, one not a checkpoint at all
    corrupt = root / "corrupt"
    corrupt.mkdir()
    blob = open(f["full"], "rb").read()
    (corrupt / "model_00003.pt").write_bytes(blob[:len(blob) // 2])
    (corrupt / "model_00006.pt").write_bytes(b"not a checkpoint\n" * 10)
    f["corrupt"] = str(corrupt)

    # a dict that torch.load reads, but not a checkpoint of ours
    f["not_ours"] = str(root / "not_ours.pt")
    torch.save({"state_dict": {}}, f["not_ours"])
    # a log.txt holding a partial line only
    f["partial_log"] = str(root / "partial" / "log.txt")
    os.makedirs(os.path.dirname(f["partial_log"]))
    open(f["partial_log"], "w").write("0 train 10.9")

    # fineweb.py's inputs and output folders: a corpus; a folder of shards without a manifest
    # ("data"); a manifest that lists a shard that is gone; .jsonl and .txt mixed
    f["jsonl"] = str(root / "docs.jsonl")
    open(f["jsonl"], "w").write('{"text": "a document"}\n')
    gone = root / "gone"
    gone.mkdir()
    (gone / "manifest.json").write_text(json.dumps(dict(
        identity={"source": {"data_files": [f["jsonl"]]}, "shard_size": 7000, "max_tokens": None},
        shards=[dict(file="edufineweb_val_000000.npy", tokens=3, next_doc=1, next_offset=0)], done=False)))
    f["gone"] = str(gone)
    mixed = root / "mixed"
    mixed.mkdir()
    shutil.copy(f["jsonl"], mixed / "a.jsonl")
    (mixed / "b.txt").write_text("a document\n")
    f["mixed"] = str(mixed)

    # a regular file, where a folder is expected
    f["a_file"] = str(root / "somefile.txt")
    open(f["a_file"], "w").write("not a folder\n")
    return f


# -----------------------------------------------------------------------------
# the cases: (script, args, expected exit code, phrases the one line must hold,
# phrases it must not hold, what the case needs: "no-cuda" / "no-mps" a machine without it:
# skipped where there is one).
# Arguments may name the built files as {name} (see `files`), and {tmp}: a fresh folder.

ARGPARSE, OURS = 2, 1


def train(**overrides):
    """The tiny CPU run's flags (a fresh log folder), with these overrides."""
    folders = dict(data_root="{data}", log_dir="{tmp}/log")
    folders.update((k, overrides.pop(k)) for k in list(folders) if k in overrides)
    return tiny_args(folders["data_root"], folders["log_dir"], **overrides)


IN_PROCESS = set()  # the ids of the rows that run in this process


def case(script, args, rc, *needles, forbid=(), needs=(), id, in_process=None):
    """A row. in_process (default: the argparse errors): the command line alone decides it, so
    main(argv) runs in this process; else a subprocess."""
    if rc == ARGPARSE if in_process is None else in_process:
        IN_PROCESS.add(id)
    return pytest.param(script, args, rc, needles, forbid, needs, id=id)


T, S, H, E = "train_gpt2.py", "sample.py", "hellaswag.py", "export_hf.py"
B, P, F, BF = "bench.py", "plot_log.py", "fineweb.py", "bench_fineweb.py"
NOT_OURS = "not a readable checkpoint"

CASES = [
    # --- train_gpt2.py: devices
    case(T, train(device="cuda"), OURS, "--device cuda", "no usable CUDA", needs=("no-cuda",),
         id="train-device-cuda"),
    case(T, train(device="tpu"), OURS, "--device must be cuda, mps or cpu, not tpu", id="train-device-tpu"),
    case(T, train(device="mps"), OURS, "--device mps", "MPS is not available", needs=("no-mps",),
         id="train-device-mps"),
    # --- one flag out of range, or not a value of its kind: argparse
    case(T, train(micro_batch_size=0), ARGPARSE, "--micro_batch_size", "at least 1", id="train-B-0"),
    case(T, train(sequence_length=0), ARGPARSE, "--sequence_length", "at least 1", id="train-T-0"),
    case(T, train(n_head=0), ARGPARSE, "--n_head", "at least 1", id="train-n_head-0"),
    case(T, train(n_embd=0), ARGPARSE, "--n_embd", "at least 1", id="train-n_embd-0"),
    case(T, train(n_layer=-1), ARGPARSE, "--n_layer", "at least 1", id="train-n_layer-neg"),
    case(T, train(total_batch_size=0), ARGPARSE, "--total_batch_size", "at least 1", id="train-total-0"),
    case(T, train(total_batch_size=-2), ARGPARSE, "--total_batch_size", "not -2", id="train-total-neg"),
    case(T, train(grad_clip=-1), ARGPARSE, "--grad_clip", "at least 0", id="train-grad_clip-neg"),
    case(T, train(max_lr="inf"), ARGPARSE, "--max_lr", "not inf", id="train-max_lr-inf"),
    case(T, train(max_lr="nan"), ARGPARSE, "--max_lr", "not nan", id="train-max_lr-nan"),
    case(T, train(weight_decay=-0.1), ARGPARSE, "--weight_decay", "at least 0", id="train-wd-neg"),
    case(T, train(keep_checkpoints=-1), ARGPARSE, "--keep_checkpoints", "at least 0", id="train-keep-neg"),
    case(T, train(dtype="float8"), ARGPARSE, "--dtype", "expected one of", id="train-dtype-bad"),
    case(T, train(compile="yes"), ARGPARSE, "--compile", "expected one of", id="train-compile-bad"),
    case(T, train(shuffle="maybe"), ARGPARSE, "--shuffle", "expected 1/0/true/false", id="train-bool-bad"),
    case(T, train(learning_rate=1e-3), ARGPARSE, "unrecognized arguments", "--learning_rate",
         id="train-unknown-flag"),
    # --- flags that contradict each other: check_config
    case(T, train(n_embd=30, n_head=4), OURS, "--n_embd 30 is not a multiple of --n_head 4",
         id="train-embd-head"),
    case(T, train(sequence_length=128), OURS, "--sequence_length 128 is longer than --block_size 64",
         id="train-T-over-block"),
    case(T, train(total_batch_size=100), OURS, "--total_batch_size 100 is not divisible",
         id="train-total-not-divisible"),
    case(T, train(min_lr=1e-3, max_lr=6e-4), OURS, "--max_lr must be above 0 and at least --min_lr",
         id="train-min-over-max"),
    case(T, train(fsdp=1), OURS, "--fsdp 1", "torchrun", id="train-fsdp-no-torchrun"),
    case(T, train(init_from="{weights}", resume="auto"), OURS, "--init_from", "--resume",
         "pass one of them", id="train-init_from-and-resume"),
    case(T, train(log_dir=""), OURS, "--log_dir and --data_root must not be empty", id="train-log_dir-empty"),
    # --- a model too small for what is asked: at the start, not at the first evaluation
    case(T, train(block_size=16, sequence_length=16, sample=1), OURS, "sampling writes 32 tokens",
         "--block_size 16", id="train-block-too-small-for-sampling"),
    case(T, train(block_size=64, vocab_size=50304, hellaswag=1, hellaswag_limit=100), OURS,
         "HellaSwag needs sequences of", "--block_size is 64",
         id="train-block-too-small-for-hellaswag"),
    case(T, train(vocab_size=100), OURS, "token ids >= --vocab_size 100", id="train-vocab-below-data"),
    # --- checkpoints whose contents disagree
    case(T, train(init_from="{misfit}"), OURS, "do not fit its config", id="train-init_from-misfit"),
    case(T, train(resume="{full_misfit}"), OURS, "full_misfit.pt", "do not fit",
         id="train-resume-weights-misfit"),
    case(T, train(resume="{weights}"), OURS, "holds weights only", "cannot resume",
         id="train-resume-weights-only"),
    # the loader position counts batches of B*T tokens: another B or T would read other tokens
    case(T, train(resume="{full}", micro_batch_size=1), OURS, "model_00003.pt was written with "
         "--micro_batch_size 2 --sequence_length 32: resume needs the same", id="train-resume-other-B"),
    case(T, train(resume="{full}", sequence_length=16), OURS, "model_00003.pt was written with "
         "--micro_batch_size 2 --sequence_length 32: resume needs the same", id="train-resume-other-T"),
    case(T, train(resume="{full}", data_root="{data1}"), OURS, "saved loader position", "past the 1 shards",
         id="train-resume-loader-past-data"),
    case(T, train(resume="{foreign}"), OURS, NOT_OURS, forbid=("weights_only=False",),
         id="train-resume-foreign-pickle"),
    case(T, train(data_root="{pickled_data}"), OURS, "edufineweb_train_000001.npy is not a token shard",
         forbid=("allow_pickle",), id="train-shard-pickled-objects"),
    # --- the file system
    case(T, train(log_dir="{a_file}"), OURS, "is a file, not a folder", id="train-log_dir-is-file"),
    case(T, train(log_dir="{a_file}/log"), OURS, "somefile.txt/log", id="train-log_dir-under-file"),
    case(T, train(log_dir="{occupied}"), OURS, "holds the checkpoints of another run", "--resume auto",
         "--overwrite 1", id="train-fresh-over-checkpoints"),
    case(T, train(log_dir="{corrupt}", resume="auto"), OURS, "--resume auto: no readable checkpoint",
         "model_00006.pt, model_00003.pt", id="train-resume-auto-all-corrupt"),

    # --- sample.py
    case(S, ["--checkpoint", "{short}", "-m", "gpt2"], OURS, "exactly one of --checkpoint and -m",
         id="sample-both"),
    case(S, [], OURS, "exactly one of --checkpoint and -m", id="sample-neither"),
    case(S, ["--checkpoint", "{tmp}/nope.pt"], OURS, "nope.pt does not exist",
         id="sample-missing-checkpoint"),
    case(S, ["--checkpoint", "{foreign}"], OURS, NOT_OURS, forbid=("weights_only=False",),
         id="sample-foreign-checkpoint"),
    case(S, ["--checkpoint", "{misfit}"], OURS, "do not fit its config", id="sample-misfit"),
    case(S, ["--checkpoint", "{not_ours}"], OURS, "not a checkpoint of train_gpt2.py",
         id="sample-dict-not-a-checkpoint"),
    case(S, ["--checkpoint", "{short}"], OURS, "longer than the model's context", "block_size 16", id="sample-prompt-over-context"),
    case(S, ["--checkpoint", "{short}", "--top_k", "0"], ARGPARSE, "--top_k", "at least 1",
         id="sample-top_k-0"),
    case(S, ["--checkpoint", "{short}", "--max_new_tokens", "4", "--top_k", "60000"], OURS,
         "--top_k must be between 1 and 50257, got 60000", id="sample-top_k-above-vocab"),
    case(S, ["--checkpoint", "{short}", "--temperature", "0"], ARGPARSE, "--temperature", "at least",
         id="sample-temperature-0"),
    case(S, ["--checkpoint", "{short}", "--num_samples", "0"], ARGPARSE, "--num_samples", "at least 1",
         id="sample-num_samples-0"),
    case(S, ["--checkpoint", "{short}", "--device", "tpu"], OURS, "--device must be cuda, mps or cpu",
         id="sample-device-tpu"),
    case(S, ["--checkpoint", "{short}", "--device", "cuda"], OURS, "no usable CUDA", needs=("no-cuda",),
         id="sample-device-cuda"),

    # --- hellaswag.py
    case(H, ["--checkpoint", "{short}", "-m", "gpt2"], OURS,
         "exactly one of -m/--model_type and --checkpoint", id="hellaswag-both"),
    case(H, [], OURS, "exactly one of -m/--model_type and --checkpoint", id="hellaswag-neither"),
    case(H, ["--checkpoint", "{tmp}/nope.pt", "--limit", "2"], OURS, "nope.pt does not exist", id="hellaswag-missing-checkpoint"),
    case(H, ["--checkpoint", "{foreign}", "--limit", "2"], OURS, NOT_OURS, forbid=("weights_only=False",), id="hellaswag-foreign-checkpoint"),
    case(H, ["--checkpoint", "{misfit}", "--limit", "2"], OURS, "do not fit its config",
         id="hellaswag-misfit"),
    case(H, ["--checkpoint", "{short}", "--limit", "2"], OURS, "HellaSwag needs sequences of",
         "block_size is 16", id="hellaswag-context-too-short"),
    case(H, ["--checkpoint", "{short}", "--limit", "0"], ARGPARSE, "--limit", "at least 1",
         id="hellaswag-limit-0"),
    case(H, ["--checkpoint", "{short}", "--batch_size", "0"], ARGPARSE, "--batch_size", "at least 1",
         id="hellaswag-batch_size-0"),
    case(H, ["--checkpoint", "{short}", "-d", "tpu"], OURS, "--device must be cuda, mps or cpu",
         id="hellaswag-device-tpu"),
    case(H, ["--checkpoint", "{short}", "-d", "cuda"], OURS, "no usable CUDA", needs=("no-cuda",),
         id="hellaswag-device-cuda"),

    # --- export_hf.py
    case(E, ["--out", "{tmp}/hf"], ARGPARSE, "required", "--checkpoint", id="export-no-checkpoint"),
    case(E, ["--checkpoint", "{tmp}/nope.pt", "--out", "{tmp}/hf"], OURS, "nope.pt does not exist",
         id="export-missing-checkpoint"),
    case(E, ["--checkpoint", "{foreign}", "--out", "{tmp}/hf"], OURS, NOT_OURS,
         forbid=("weights_only=False",), id="export-foreign-checkpoint"),
    case(E, ["--checkpoint", "{misfit}", "--out", "{tmp}/hf"], OURS, "do not fit its config",
         id="export-misfit"),
    case(E, ["--checkpoint", "{short}", "--out", "{a_file}"], OURS, "exists and is not a folder",
         id="export-out-is-file"),
    case(E, ["--checkpoint", "{short}", "--out", "{a_file}/hf"], OURS, "cannot write", "somefile.txt/hf",
         id="export-out-under-file"),

    # --- bench.py
    case(B, ["--rungs", "9"], ARGPARSE, "--rungs", "expected rung numbers 1-7", id="bench-rungs-9"),
    case(B, ["--steps", "0"], ARGPARSE, "--steps", "at least 1", id="bench-steps-0"),
    case(B, ["--rungs", "x"], ARGPARSE, "--rungs", "expected rung numbers 1-7", id="bench-rungs-x"),
    case(B, ["--rungs", ""], ARGPARSE, "--rungs", "expected rung numbers 1-7", id="bench-rungs-empty"),
    case(B, ["--rungs", "0"], ARGPARSE, "--rungs", "expected rung numbers 1-7", id="bench-rungs-0"),
    case(B, ["--rungs", "1,8"], ARGPARSE, "--rungs", "expected rung numbers 1-7", id="bench-rungs-1,8"),
    case(B, ["--warmup_steps", "-1"], ARGPARSE, "argument --warmup_steps: must be at least 0, not -1",
         id="bench-warmup-neg"),
    case(B, ["--device", "tpu"], OURS, "--device must be cuda, mps or cpu", id="bench-device-tpu"),
    case(B, ["--device", "cpu", "--n_embd", "30", "--n_head", "4"], OURS,
         "--n_embd 30 is not a multiple of --n_head 4", id="bench-embd-head", in_process=True),
    case(B, ["--device", "cuda"], OURS, "no usable CUDA", needs=("no-cuda",), id="bench-device-cuda",
         in_process=True),
    case(B, ["--device", "cpu", "--sequence_length", "2048"], OURS, "--sequence_length 2048 is longer",
         id="bench-T-over-block"),

    # --- plot_log.py
    case(P, ["{tmp}/log.txt"], OURS, "log.txt does not exist", id="plot-missing-log", in_process=True),
    case(P, ["{partial_log}"], OURS, "no data lines", id="plot-no-data-lines"),
    case(P, ["{tmp}/log.txt", "--smooth", "2"], ARGPARSE, "--smooth", "[0, 1)", id="plot-smooth-2"),
    case(P, ["{short}"], OURS, "short.pt is not a log.txt", "binary data", id="plot-a-checkpoint"),
    # --- no script takes a prefix of a flag for the flag (argparse's allow_abbrev)
    case(T, ["--max_step", "5"], ARGPARSE, "unrecognized arguments: --max_step", id="train-abbrev"),
    case(F, ["--max_token", "5"], ARGPARSE, "unrecognized arguments: --max_token", id="fineweb-abbrev"),
    case(S, ["--checkpoint", "{short}", "--temp", "2"], ARGPARSE, "unrecognized arguments: --temp",
         id="sample-abbrev"),

    # --- fineweb.py
    case(F, ["--local_dir", "{tmp}/out", "--max_tokens", "0"], OURS, "--max_tokens must be >= 1",
         id="fineweb-max_tokens-0"),
    # the ranges come first: the missing --data_files is not looked at, nothing is written
    case(F, ["--local_dir", "{tmp}/out", "--data_files", "{tmp}/missing.jsonl", "--max_tokens", "-5"], OURS,
         "fineweb.py: error: --max_tokens must be >= 1 or omitted, not -5", id="fineweb-max_tokens-neg",
         in_process=True),
    case(F, ["--local_dir", "{tmp}/out", "--shard_size", "0"], OURS, "--shard_size must be >= 1, not 0",
         id="fineweb-shard_size-0", in_process=True),
    case(F, ["--local_dir", "{tmp}/out", "--num_proc", "0"], OURS, "--num_proc must be >= 1",
         id="fineweb-num_proc-0", in_process=True),
    case(F, ["--local_dir", "{tmp}/out", "--num_proc", "two"], ARGPARSE, "--num_proc",
         "invalid int value: 'two'", id="fineweb-num_proc-two"),
    case(F, ["--local_dir", "{tmp}/out", "--shard_size", "1e6"], ARGPARSE, "fineweb.py: error: ",
         "--shard_size", id="fineweb-shard_size-float"),
    case(F, ["--local_dir", "{tmp}/out", "--overwrite", "maybe"], ARGPARSE, "fineweb.py: error: ",
         "--overwrite", id="fineweb-overwrite-bad"),
    case(F, ["--local_dir", "{tmp}/out", "--data_files", "{tmp}/none*.jsonl"], OURS, "matches no file",
         id="fineweb-data_files-none"),
    case(F, ["--local_dir", "{a_file}"], OURS, "is a file, not a folder", id="fineweb-local_dir-is-file"),
    case(F, ["--data_files", "{jsonl}", "--local_dir", "{data}"], OURS, "holds shards but no manifest.json",
         "--overwrite", id="fineweb-shards-without-manifest"),
    case(F, ["--data_files", "{jsonl}", "--local_dir", "{gone}", "--shard_size", "7000"], OURS,
         "edufineweb_val_000000.npy, listed in", "manifest.json, is gone", id="fineweb-manifest-shard-gone"),
    case(F, ["--data_files", "{mixed}/*", "--local_dir", "{tmp}/out"], OURS,
         "--data_files must be all .parquet, all .jsonl/.json or all .txt, not .jsonl, .txt",
         id="fineweb-mixed-inputs"),

    # --- bench_fineweb.py
    case(BF, ["--copies", "0"], ARGPARSE, "bench_fineweb.py: error", "must be", id="bench_fineweb-copies-0"),
]
# the argparse errors that still run as a subprocess: the script's own exit path, once per kind
SMOKE = {"train-B-0", "train-abbrev", "sample-top_k-0", "export-no-checkpoint", "plot-smooth-2",
         "bench-rungs-9", "fineweb-abbrev", "bench_fineweb-copies-0"}
SUBPROCESS_CASES = [c for c in CASES if c.id not in IN_PROCESS or c.id in SMOKE]
IN_PROCESS_CASES = [c for c in CASES if c.id in IN_PROCESS and c.id not in SMOKE]


# -----------------------------------------------------------------------------
# Each case is one subprocess, whose start (importing torch) is most of its time: the selected
# cases run WORKERS at a time in the background, in the table's order, as soon as the files
# exist, and each test waits for its own.

WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
HAS = {"no-cuda": torch.cuda.is_available(),  # where the machine has it, it is not an error
       "no-mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
TEST_NAME = "test_bad_input_fails_in_one_line"


def start(script, args, names):
    """The case's subprocess, and the names its {placeholders} stood for."""
    return run([a.format(**names) for a in args], script=script, check=False, timeout=300), names


@pytest.fixture(scope="module")
def outcomes(files, tmp_path_factory, request):
    """{case id: future of (CompletedProcess, the names its {placeholders} stood for)}."""
    selected = {item.callspec.id for item in request.session.items
                if getattr(item, "originalname", None) == TEST_NAME and item.path == request.path}
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {}
    for param in SUBPROCESS_CASES:
        script, args, _, _, _, needs = param.values
        if param.id in selected and not any(HAS.get(need) for need in needs):
            names = dict(files, tmp=str(tmp_path_factory.mktemp(param.id)))
            futures[param.id] = pool.submit(start, script, args, names)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("script, args, rc, needles, forbid, needs", SUBPROCESS_CASES)
def test_bad_input_fails_in_one_line(outcomes, request, script, args, rc, needles, forbid, needs):
    for need in needs:
        if HAS.get(need):
            pytest.skip(f"this machine has {need[3:]}")
    p, names = outcomes[request.node.callspec.id].result()
    line = one_line_error(p, *(n.format(**names) for n in needles), rc=rc)
    for bad in forbid:
        assert bad not in line, line


@pytest.mark.slow
@pytest.mark.parametrize("script, args, message", [
    (F, ["--max_tokens", "1000"], "cannot load HuggingFaceFW/fineweb-edu from the Hugging Face hub"),
    (S, ["-m", "gpt2", "--device", "cpu"], "cannot load gpt2 from Hugging Face"),
], ids=["fineweb", "sample"])
def test_the_hub_offline_with_an_empty_cache_is_one_line(tmp_path, script, args, message):
    """What a machine without network and without Hugging Face's cache gets, for real."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    p = run(args + ["--local_dir", str(tmp_path / "out")] * (script == F), script=script, env=env,
            check=False, timeout=120)
    one_line_error(p, message, "HF_ENDPOINT", rc=1)


class Unread(dict):
    """The files a row names: the command line is rejected before any is looked at."""

    def __missing__(self, key):
        return f"/nonexistent/{key}"


@pytest.mark.parametrize("script, args, rc, needles, forbid, needs", IN_PROCESS_CASES)
def test_bad_command_line_fails_in_one_line_in_process(tmp_path, capsys, script, args, rc, needles,
                                                        forbid, needs):
    for need in needs:
        if HAS.get(need):
            pytest.skip(f"this machine has {need[3:]}")
    main = importlib.import_module(script[:-3]).main
    try:
        code = main([a.format_map(Unread(tmp=str(tmp_path))) for a in args])
    except SystemExit as e:  # argparse's exit, or fineweb's SystemExit(message): status 1
        code = e.code
    out, err = capsys.readouterr()
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    line = one_line_error(SimpleNamespace(returncode=code, stderr=err), *needles, rc=rc)
    assert "error: " in line, line
    for bad in forbid:
        assert bad not in line, line
    assert not os.listdir(tmp_path)  # nothing written
