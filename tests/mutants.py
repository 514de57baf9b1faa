"""A mutation check of the suite (a dev tool: not part of the CI run, and pytest does not collect
it). Each mutant is a one-line change to the resume, checkpoint or distributed code. For each,
the repository's tracked files are copied to a temporary folder, the mutant applied there, and
the tests that should notice it are run against the copy (`pytest -x`): the mutant is killed
when they fail. The working tree is never changed. Every mutant must be killed; the exit status
is the number that survived.

    python tests/mutants.py                 # all of them (about 25 minutes on 2 cores)
    python tests/mutants.py resume-off scaler-not-loaded
    python tests/mutants.py --list
    python tests/mutants.py resume-off --each --tests tests/test_resume.py  # every test must fail
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# test ids, cheapest and most direct first (pytest -x stops at the first failure)
STATE = "tests/test_resume.py::test_every_piece_of_the_checkpointed_state_comes_back"
RNG = "tests/test_resume.py::test_rng_state_round_trip_through_a_saved_file"
EXACT = "tests/test_resume.py::test_sigkill_then_resume_is_exact"
EXACT_1 = EXACT + "[after-save]"
EXACT_2 = EXACT + "[two-processes]"
FLOAT16 = "tests/test_resume.py::test_float16_with_a_lowered_gradient_scale_resumes_exactly"
TRIM = "tests/test_resume.py::test_kill_while_trimming_the_log_loses_nothing"
HALF_LINE = "tests/test_resume.py::test_a_half_written_last_log_line_is_trimmed_on_resume"
KEEP = "tests/test_resume.py::test_keep_checkpoints_never_deletes_the_one_just_written"
SIGTERM = "tests/test_resume.py::test_sigterm_checkpoints_and_exits_cleanly"
FINISHED = "tests/test_resume.py::test_resume_of_a_finished_run"
FSDP_RESUME = "tests/test_scale.py::test_fsdp_sigkill_and_resume_is_exact"
MOVES = "tests/test_scale.py::test_resume_moves_between_ddp_fsdp_and_one_process"
DDP = "tests/test_train.py::test_two_processes_equal_one_process_and_mfu_is_per_process"
LOADER_RANKS = "tests/test_data.py::test_loader_ranks_interleave_the_single_process_stream"
LOADER_STATE = "tests/test_data.py::test_loader_state_round_trip"
WORLD = "tests/test_resume.py::test_resume_with_another_world_size"
WARNINGS = "tests/test_resume.py::test_resume_with_other_flags_warns_once_with_each_effect"
CLIP = "tests/test_train.py::test_grad_clip_0_leaves_the_gradient_whole"
SHUFFLE = "tests/test_data.py::test_loader_shuffle"
RANK_1 = "tests/test_resume.py::test_sigterm_to_rank_1_stops_every_rank_at_the_same_step"

# name: (file, the line's text as it is, the line as mutated, the tests to run)
MUTANTS = {
    "resume-off": ("train_gpt2.py", "    if not cfg.resume:\n        return 0",
                   "    if True:\n        return 0", [EXACT_1, TRIM, FLOAT16]),
    "resume-returns-0": ("train_gpt2.py", "stream's\")\n    return step\n", "stream's\")\n    return 0\n",
                         [EXACT_1, STATE]),
    "step-off-by-one": ("train_gpt2.py", '    step = checkpoint["step"]\n',
                        '    step = checkpoint["step"] + 1\n', [STATE, EXACT_1]),
    "optimizer-not-loaded": ("train_gpt2.py", "    set_optimizer_state_dict(model, optimizer, optim_state, options=options)",
                             "    pass", [STATE, EXACT_1]),
    "adam-moments-not-saved": ("train_gpt2.py", '"state": {ids[n]: v for n, v in optim.get("state", {}).items()}',
                               '"state": {}', [STATE, EXACT_1]),
    "loader-not-restored": ("train_gpt2.py", '    train_loader.set_state(checkpoint["loader"])',
                            "    pass", [STATE, EXACT_1]),
    "loader-position-in-tokens": ("train_gpt2.py", "batch=self.current_position // (self.B * self.T))",
                                  "batch=self.current_position)", [LOADER_STATE, STATE, EXACT_1]),
    "scaler-not-loaded": ("train_gpt2.py", '    scaler.load_state_dict(checkpoint.get("scaler") or scaler.state_dict())',
                          "    pass", [STATE, FLOAT16]),
    "scaler-not-saved": ("train_gpt2.py", '"scaler": scaler.state_dict(),', '"scaler": None,', [STATE, FLOAT16]),
    "rng-not-restored": ("train_gpt2.py", '    set_rng_state(checkpoint["rng"])', "    pass", [STATE]),
    "numpy-rng-not-restored": ("train_gpt2.py", '    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"]))',
                               "    pass", [RNG, STATE]),
    "python-rng-not-restored": ("train_gpt2.py", '    random.setstate(state["python"])', "    pass", [RNG, STATE]),
    "schedule-restarts": ("train_gpt2.py", "        lr = get_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)",
                          "        lr = get_lr(step - start_step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)",
                          [EXACT_1]),
    "oldest-checkpoint-first": ("train_gpt2.py", "    for _, path in reversed(list_checkpoints(cfg.log_dir)):",
                                "    for _, path in list_checkpoints(cfg.log_dir):", [TRIM]),
    "log-keeps-resumed-step": ("train_gpt2.py", "    lines = [l for l in old if int(l.split(\" \", 1)[0]) < start_step]",
                               "    lines = [l for l in old if int(l.split(\" \", 1)[0]) <= start_step]", [HALF_LINE, TRIM]),
    "log-keeps-half-line": ("train_gpt2.py", '            old = [l for l in f if l.endswith("\\n") and l.split(" ", 1)[0].isdigit()]',
                            '            old = [l for l in f if l.split(" ", 1)[0].isdigit()]', [HALF_LINE]),
    "keep-counts-later-runs": ("train_gpt2.py", "[c for c in list_checkpoints(cfg.log_dir) if c[0] <= step]",
                               "list_checkpoints(cfg.log_dir)", [KEEP]),
    "sigterm-saves-wrong-step": ("train_gpt2.py", "            checkpoint(step + 1)\n", "            checkpoint(step)\n",
                                 [SIGTERM]),
    "finished-run-trains-on": ("train_gpt2.py", "    if step == cfg.max_steps:\n", "    if False:\n", [FINISHED]),
    "resume-warnings-off": ("train_gpt2.py", "    if changed:\n", "    if False:\n", [WARNINGS]),
    "seed-warning-always": ("train_gpt2.py", 'and (k != "seed" or cfg.shuffle)]', "]", [WARNINGS]),
    "grad-clip-0-clips-to-0": ("train_gpt2.py", "grad_clip if grad_clip > 0 else math.inf)", "grad_clip)", [CLIP]),
    "shuffle-ignores-the-epoch": ("train_gpt2.py", "default_rng([self.seed, self.epoch, *key])",
                                  "default_rng([self.seed, *key])", [SHUFFLE, EXACT + "[shuffle]"]),
    "fineweb-boundary-not-done": ("fineweb.py", '    if not manifest["done"]:  # the stream ended on a shard boundary',
                                  "    if False:", ["tests/test_fineweb.py::test_a_corpus_that_ends_on_a_shard_boundary"]),
    # distributed paths
    "no-loss-all-reduce": ("train_gpt2.py", "            dist.all_reduce(stats, op=dist.ReduceOp.SUM)", "            pass",
                           [DDP]),
    "grad-accum-ignores-world-size": ("train_gpt2.py", "    grad_accum_steps = total_batch_size // (B * T * ddp_world_size)",
                                      "    grad_accum_steps = total_batch_size // (B * T)", [DDP]),
    "loss-not-divided-by-accum": ("train_gpt2.py", "        loss = loss / grad_accum_steps\n", "        loss = loss\n",
                                  [DDP]),
    "no-gradient-sync": ("train_gpt2.py", "            model.require_backward_grad_sync = (micro_step == grad_accum_steps - 1)",
                         "            model.require_backward_grad_sync = False", [DDP]),
    "every-rank-reads-rank-0s-batch": ("train_gpt2.py", "            if rank == self.process_rank:",
                                       "            if rank == 0:", [LOADER_RANKS, DDP]),
    "weights-not-loaded": ("train_gpt2.py", "    set_model_state_dict(model, dict(model_state), options=options)",
                           "    pass", [FSDP_RESUME, MOVES]),
    "world-size-resume-rescales-position": ("train_gpt2.py", "        self.current_position = state[\"batch\"] * self.B * self.T",
                                            "        self.current_position = state[\"batch\"] * self.B * self.T * self.num_processes",
                                            [LOADER_STATE, WORLD, EXACT_2]),
}


def copy_repo(dest):
    """The repository's files as git sees them (tracked, and untracked but not ignored)."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def check(name, file, old, new, tests, timeout, each=False):
    """'killed' (by which test), 'SURVIVED', or why the mutant could not be tried. each: run
    every test (no -x) and say how many failed; 'SURVIVED' names those that passed."""
    with tempfile.TemporaryDirectory(prefix=f"mutant_{name}_") as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        text = (copy / file).read_text()
        if text.count(old) != 1:
            return f"not applied ({text.count(old)} matches: the code changed)", 0.0
        (copy / file).write_text(text.replace(old, new))
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                                "-o", "addopts="] + ([] if each else ["-x"]) + tests, cwd=copy,
                               capture_output=True, text=True, timeout=timeout,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
        except subprocess.TimeoutExpired:
            return "killed (timeout)", time.time() - t0
        if each:
            failed = [l.split()[1] for l in p.stdout.splitlines() if l.startswith(("FAILED ", "ERROR "))]
            passed = [l.split()[1].split("::", 1)[1] for l in p.stdout.splitlines() if l.startswith("PASSED ")]
            if passed:
                return f"SURVIVED in {len(passed)}: {', '.join(passed)}", time.time() - t0
            return f"killed by each of the {len(failed)} tests", time.time() - t0
        if p.returncode == 1:  # a test failed
            failed = [l.split()[1] for l in p.stdout.splitlines() if l.startswith("FAILED ")]
            return f"killed by {failed[0].split('::', 1)[1] if failed else '?'}", time.time() - t0
        if p.returncode == 0:
            return "SURVIVED", time.time() - t0
        return f"error (pytest exit {p.returncode}: {p.stdout.strip().splitlines()[-1:]})", time.time() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to try (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    parser.add_argument("--each", action="store_true", help="run all the tests (no -x): each must fail")
    parser.add_argument("--tests", nargs="+", help="run these test ids instead of the mutant's own "
                        "(e.g. to show that one test alone kills it)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MUTANTS]
    if unknown:
        parser.error(f"unknown mutant {unknown[0]}; --list shows them")
    if args.list:
        for name, (file, old, new, _) in MUTANTS.items():
            print(f"{name}: {file}: {old.strip()!r} -> {new.strip()!r}")
        return 0
    survived = 0
    print("| mutant | change | result | seconds |\n|---|---|---|---|", flush=True)
    for name in args.names or MUTANTS:
        file, old, new, tests = MUTANTS[name]
        tests = args.tests or tests
        result, seconds = check(name, file, old, new, tests, args.timeout, args.each)
        survived += not result.startswith("killed")
        before, after = next((a, b) for a, b in zip(old.splitlines(), new.splitlines()) if a != b)
        change = f"`{before.strip()}` -> `{after.strip()}`"
        print(f"| {name} | {change.replace('|', '&#124;')} | {result} | {seconds:.0f} |", flush=True)
    return survived


if __name__ == "__main__":
    sys.exit(main())
