"""Faults a long run meets, made for real: a worker SIGKILLed under torchrun --max-restarts, a
peer that hangs (SIGSTOP) or never starts, a second run into the same folder, a full disk (a
tmpfs), and damaged files of every kind that a script reads."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, log_text, make_shards, tiny_args

# -----------------------------------------------------------------------------
# helpers: a script run under a prelude (Python run first in the same process)

# KILL_STEP / KILL_RANK / SIGNAL: the process of that local rank sends itself SIGNAL just before
# optimizer step KILL_STEP, in torchrun's first attempt only. In a restarted attempt local rank 0
# starts RESTART_DELAY seconds late (as a slower node would): the others reach the process
# group first
STEP_PRELUDE = """
import os, signal, sys, time
import train_gpt2
if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and os.environ.get("LOCAL_RANK") == "0":
    time.sleep(float(os.environ.get("RESTART_DELAY", "0")))
real_train_step, calls = train_gpt2.train_step, [0]
def train_step(*args, **kwargs):
    if (calls[0] == int(os.environ["KILL_STEP"]) and os.environ.get("LOCAL_RANK") == os.environ["KILL_RANK"]
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    calls[0] += 1
    return real_train_step(*args, **kwargs)
train_gpt2.train_step = train_step
"""


def script_with_prelude(tmp_path, prelude, module="train_gpt2"):
    path = tmp_path / f"with_prelude_{module}.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n{prelude}\nimport {module}\n"
                    f"sys.exit({module}.main())\n")
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


# -----------------------------------------------------------------------------
# torchrun --max-restarts: a SIGKILLed worker, the pair restarted, the run finished by itself

def torchrun(args, restarts, env=None, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}"] + args
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_sigkilled_worker_under_max_restarts_recovers_to_the_uninterrupted_log(data, tmp_path):
    clean, log_dir = str(tmp_path / "clean"), str(tmp_path / "log")
    flags = dict(max_steps=12, resume="auto")  # checkpoints at 3, 6, 9, 11, 12
    p = torchrun([str(REPO / "train_gpt2.py")] + tiny_args(data, clean, **flags), restarts=0)
    assert p.returncode == 0, p.stderr[-3000:]
    # local rank 1 is SIGKILLed before step 7: torchrun restarts both, which resume at step 6.
    # Rank 0 restarts late: without a key prefix per attempt, rank 1 reads the dead rank 0's
    # address from torchrun's store and fails to connect (or hangs: the timeout bounds it).
    script = script_with_prelude(tmp_path, STEP_PRELUDE)
    p = torchrun([script] + tiny_args(data, log_dir, **flags, ddp_timeout=60), restarts=3, timeout=180,
                 env=dict(KILL_STEP="7", KILL_RANK="1", SIGNAL="SIGKILL", RESTART_DELAY="3"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "exitcode: -9" in p.stderr and "local_rank: 1" in p.stderr, p.stderr[-3000:]  # it was killed
    assert f"resumed from {log_dir}/model_00006.pt at step 6" in p.stdout, p.stdout[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert log_text(log_dir) == log_text(clean)  # line for line
    assert log_text(clean).count(" train ") == 12


# -----------------------------------------------------------------------------
# bounded waits: a peer that hangs (SIGSTOP) or never starts; the others end with one line

def launch(rank, args, port, env=None):
    """One process of a 2-process run started as a scheduler does (srun: RANK, WORLD_SIZE, ...)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
    return subprocess.Popen([sys.executable] + args, cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="SIGSTOP")
@pytest.mark.parametrize("fault", ["hangs", "never starts"])
def test_a_rank_waiting_on_a_hung_or_missing_peer_exits_with_one_line(data, tmp_path, fault):
    timeout = 4
    args = tiny_args(data, str(tmp_path / "log"), ddp_timeout=timeout)
    port, peer = free_port(), None
    t0 = time.time()
    if fault == "hangs":  # rank 1 stops itself (SIGSTOP) before step 3, inside the run
        script = script_with_prelude(tmp_path, STEP_PRELUDE)
        peer = launch(1, [script] + args, port, env=dict(KILL_STEP="3", KILL_RANK="1", SIGNAL="SIGSTOP"))
    rank0 = launch(0, [str(REPO / "train_gpt2.py")] + args, port)
    try:
        out, err = rank0.communicate(timeout=120)
    finally:
        for p in (rank0, peer):
            if p and p.poll() is None:
                p.kill()
                p.communicate()
    elapsed = time.time() - t0
    assert rank0.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: "), err[-3000:]
    assert f"--ddp_timeout {timeout}s" in lines[0], lines[0]
    if fault == "hangs":
        assert "step     2" in out and "step     3" not in out, out[-2000:]  # it waited at step 3
    assert elapsed < 60 + 2 * timeout, elapsed  # the start (imports) plus the timeout, not forever
