"""plot_log.py: parsing the trainer's log (also a log being written), smoothing chosen from the
run's length, the PNG (its errors: test_errors.py)."""
import os

import pytest

import plot_log

LOG = ("0 val 10.9876\n0 hella 0.2500\n0 train 10.950000\n1 train 9.500000\n"
       "garbage line\n2 train 7.250000\n3 train 4.125000\n3 val 4.5000\n3 hella 0.2600\n"
       "4 train 3.900000\n5 train 4.000000\n5 val 4.2500\n5 hella 0.2550\n"
       "6 train 1.5")  # the trainer is writing "6 train 1.5xxxxx": not a value yet


def write_log(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_parse_log_skips_garbage_old_header_and_partial_line(tmp_path):
    old_header = '{"n_layer": 12, "max_steps": 19073}\n'  # the first line of older logs
    data = plot_log.parse_log(write_log(tmp_path / "run" / "log.txt", old_header + LOG))
    assert data["train"] == ([0, 1, 2, 3, 4, 5], [10.95, 9.5, 7.25, 4.125, 3.9, 4.0])
    assert data["val"] == ([0, 3, 5], [10.9876, 4.5, 4.25])
    assert data["hella"] == ([0, 3, 5], [0.25, 0.26, 0.255])


def test_ema_is_bias_corrected():
    assert plot_log.ema([5.0, 5.0, 5.0], 0.99) == pytest.approx([5.0, 5.0, 5.0])
    assert plot_log.ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 0.75 * 2) / 0.75])


def test_smoothing_follows_the_run_length():
    """A short run's smoothed curve ends near its real loss; the full run keeps 0.99."""
    losses = [10.9 - 1.5 * i / 49 for i in range(50)]  # 50 steps, 10.9 -> 9.4
    smoothed = plot_log.ema(losses, plot_log.auto_smoothing(50)) if plot_log.auto_smoothing(50) else losses
    assert smoothed[-1] == pytest.approx(9.4, abs=0.05)
    assert plot_log.ema(losses, 0.99)[-1] > 10.0  # the old fixed default: far above the loss
    long = plot_log.auto_smoothing(2000)
    assert 0.9 < long < 0.99 and plot_log.auto_smoothing(19073) == 0.99
    slope = [10 - i / 1000 for i in range(2000)]  # a window of 2% of the run lags by ~1%
    assert plot_log.ema(slope, long)[-1] - slope[-1] < 0.05


def test_plot_one_log(tmp_path, capsys):
    log = write_log(tmp_path / "run" / "log.txt", LOG)
    assert plot_log.main([log]) == 0
    png = tmp_path / "run" / "log.png"  # next to the log by default
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert ("run: min train loss 3.9000 (step 4), min val loss 4.2500 (step 5), "
            "max HellaSwag 0.2600 (step 3)") in out


def test_plot_two_logs(tmp_path, capsys):
    a = write_log(tmp_path / "run_a" / "log.txt", LOG)
    b = write_log(tmp_path / "run_b" / "log.txt", "0 train 11.0\n1 train 8.0\n1 val 8.5\n")
    png = tmp_path / "plots" / "compare.png"
    assert plot_log.main([a, b, "--out", str(png), "--smooth", "0.5"]) == 0
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "run_a: min train loss 3.9000 (step 4)" in out
    assert ("run_b: min train loss 8.0000 (step 1), min val loss 8.5000 (step 1), "
            "max HellaSwag -") in out


def test_the_loss_axis_fits_the_run():
    def run_of(losses):
        return [("run", {"train": (list(range(len(losses))), losses), "val": ([], []), "hella": ([], [])})]
    short = [10.9 - 4.5 * i / 149 for i in range(150)]  # a short run: 10.9 -> 6.4
    low, high, reference = plot_log.loss_axis(run_of(short))
    assert not reference and low == pytest.approx(6.3) and high == pytest.approx(short[3] + 0.1)
    full = [11.0] + [3.35 + 2.0 / (1 + i / 500) for i in range(19072)]  # the full run: 11 -> 3.4
    low, high, reference = plot_log.loss_axis(run_of(full))
    assert reference and low == pytest.approx(plot_log.GPT2_VAL_LOSS - 0.1)
    assert high < 5.0  # step 0's 11 does not flatten the curve
    nan = plot_log.loss_axis(run_of([float("nan"), float("inf")]))
    assert nan == (None, None, False)


def test_a_run_folder_stands_for_its_log(tmp_path, capsys):
    write_log(tmp_path / "log_demo" / "log.txt", LOG)
    assert plot_log.main([str(tmp_path / "log_demo")]) == 0
    assert (tmp_path / "log_demo" / "log.png").stat().st_size > 10_000
    assert "log_demo: min train loss 3.9000" in capsys.readouterr().out


def test_a_run_that_diverged_plots_and_reports_its_finite_best(tmp_path, capsys):
    """nan and inf losses (a diverged run) are drawn as gaps: the PNG is written, the loss
    axis fits the finite points, and the summary's minimum is a finite loss."""
    log = write_log(tmp_path / "run" / "log.txt", "0 train 10.9\n0 val 10.95\n1 train 9.5\n2 train nan\n"
                    "3 train inf\n4 train 9.25\n4 val nan\n")
    assert plot_log.main([log, "--out", str(tmp_path / "run.png")]) == 0
    assert (tmp_path / "run.png").stat().st_size > 10_000
    assert "run: min train loss 9.2500 (step 4), min val loss 10.9500 (step 0), max HellaSwag -" in \
        capsys.readouterr().out


def test_two_runs_in_folders_of_the_same_name_are_labelled_by_their_paths(tmp_path, capsys):
    a = write_log(tmp_path / "a" / "log" / "log.txt", "0 train 10.0\n")
    b = write_log(tmp_path / "b" / "log" / "log.txt", "0 train 11.0\n")
    assert plot_log.main([a, b, "--out", str(tmp_path / "both.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"{tmp_path}/a/log: min train loss 10.0000 (step 0), min val loss -, max HellaSwag -",
                       f"{tmp_path}/b/log: min train loss 11.0000 (step 0), min val loss -, max HellaSwag -"]
