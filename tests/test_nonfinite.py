"""A nan/inf loss or gradient norm never reaches the weights: the step is skipped with a warning,
5 such steps in a row stop the run with one line, and no checkpoint holds nan/inf weights."""
import math
import os

import pytest
import torch
from conftest import checkpoint_names, make_shards, one_line_error, run, tiny_args, tiny_model

import train_gpt2


def one_step(model, optimizer, scaler, poison):
    """A backward whose gradients are nan where poison, then step_if_finite."""
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    _, loss = model(x, x)
    scaler.scale(loss * (math.nan if poison else 1.0)).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    train_gpt2.step_if_finite(optimizer, scaler, norm)
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("scaled", [False, True])
def test_a_nan_gradient_changes_no_weight_and_no_adamw_state(scaled):
    """bfloat16/float32 (no scaler): the guard skips; float16's scaler skips it itself."""
    model = tiny_model()
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=scaled)
    one_step(model, optimizer, scaler, poison=False)  # AdamW has state now
    before = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    one_step(model, optimizer, scaler, poison=True)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, optimizer.state.values()))
    one_step(model, optimizer, scaler, poison=False)  # and a good step still steps
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_float16_overflow_skips_do_not_count_toward_the_stop(tmp_path):
    """Under the scaler, an inf norm with a finite loss is an overflow it handles: no warning,
    no count. A nan loss counts under any dtype; 5 in a row raise Diverged."""
    lines = []
    for scaled in (True, False):
        guard = train_gpt2.NonFiniteSteps(train_gpt2.TrainConfig(log_dir=str(tmp_path)),
                                          torch.amp.GradScaler("cpu", enabled=scaled), lines.append)
        for step in range(10):
            guard.check(step, 3.0, math.inf if scaled else 1.0)
        assert lines == []
    for step in range(4):
        guard.check(step, math.nan, math.nan)
    guard.check(4, 3.0, 1.0)  # a good step: the count starts again
    for step in range(5, 9):
        guard.check(step, 3.0, math.inf)
    assert len(lines) == 8 and lines[0].startswith("warning: step 0: ")
    with pytest.raises(train_gpt2.Diverged, match="5 steps in a row.*newest checkpoint, all finite, is none"):
        guard.check(9, math.nan, 1.0)


def test_a_checkpoint_of_nan_weights_is_not_written(tmp_path):
    model = tiny_model()
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    cfg = train_gpt2.TrainConfig(log_dir=str(tmp_path))
    with pytest.raises(train_gpt2.Diverged, match="before step 4 are not all finite: model_00004.pt not written"):
        train_gpt2.save_checkpoint(cfg, 4, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                   None, None, 1, True, print)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("torchrun", [0, 2])
def test_a_diverging_run_stops_with_one_line_naming_its_last_good_checkpoint(tmp_path, torchrun):
    """--max_lr 1e5: without the guard the loss is nan by step 3, every later step logs nan and
    the checkpoints hold nan weights. With it: steps 1-5 are skipped with a warning each, the run
    stops after the 5th, names model_00003.pt (written before step 3) and exits 1; every
    checkpoint is finite. On 2 processes every rank decides alike, and rank 0 says it."""
    data = make_shards(tmp_path / "data")
    log_dir = str(tmp_path / "log")
    p = run(tiny_args(data, log_dir, max_steps=30, max_lr=1e5, min_lr=0), torchrun=torchrun, check=False)
    if torchrun:  # torchrun adds its own report of the failed processes
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode != 0 and len(errors) == 1 and 'train_gpt2.py", line' not in p.stderr, p.stderr[-3000:]
    else:
        errors = [one_line_error(p, rc=1)]
    assert "error: stopped at step 5: 5 steps in a row" in errors[0] and f"{log_dir}/model_00003.pt" in errors[0]
    warnings = [line for line in p.stdout.splitlines() if line.startswith("warning: step ")]
    assert [int(w.split()[2][:-1]) for w in warnings] == [1, 2, 3, 4, 5], p.stdout[-3000:]
    assert checkpoint_names(log_dir) == ["model_00003.pt"]
    weights = torch.load(os.path.join(log_dir, "model_00003.pt"), weights_only=True)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())
