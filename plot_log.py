"""
Plot the losses and HellaSwag accuracy that train_gpt2.py writes to log/log.txt.

    python plot_log.py                                  # log/log.txt -> log/log.png
    python plot_log.py run_a/log.txt run_b/log.txt --out compare.png

Left: train loss (raw, and an exponential moving average) and val loss, with OpenAI's
GPT-2 124M val loss on the same FineWeb-Edu val shard as a line. Right: HellaSwag acc_norm with
GPT-2 124M and GPT-3 124M as lines, and chance (0.25). Several logs are drawn
together, labelled by their folder names. It also prints min train loss, min val loss and max
HellaSwag per log. Safe on the log of a running job: a half-written last line is ignored.
"""
import argparse
import math
import os
import sys

GPT2_VAL_LOSS = 3.2924  # OpenAI GPT-2 124M on the FineWeb-Edu val shard
GPT2_HELLA = 0.2955  # GPT-2 124M acc_norm, scored as hellaswag.py does (0.2945 in another measurement)
GPT3_HELLA = 0.337  # GPT-3 Small (125M), zero-shot (GPT-3 paper)
KINDS = ("train", "val", "hella")


class LogError(Exception):
    """A mistake the user can fix: printed as one line, exit status 1."""


def parse_log(path):
    """{"train"|"val"|"hella": ([steps], [values])} from lines "{step} {kind} {value}" of a
    log.txt. Anything else (an older log's JSON header, a garbled
    line) is skipped."""
    if not os.path.isfile(path):
        raise LogError(f"log file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:  # a checkpoint, a PNG: not text
        raise LogError(f"{path} is not a log.txt of train_gpt2.py (it holds binary data)") from None
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # the trainer is mid-write: "123 train 3.4" may be "123 train 3.45..."
    data = {kind: ([], []) for kind in KINDS}
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or parts[1] not in KINDS or not parts[0].isdigit():
            continue
        try:
            value = float(parts[2])
        except ValueError:
            continue
        data[parts[1]][0].append(int(parts[0]))
        data[parts[1]][1].append(value)
    if not any(steps for steps, _ in data.values()):
        raise LogError(f"{path} has no data lines (expected lines like '0 train 10.98')")
    return data


def auto_smoothing(num_steps):
    """The EMA factor for a run of num_steps: a window of about 2% of the run, at most 100
    steps (0.99, for the 19,073-step run), none for runs under 100 steps, whose curve a long
    window would drag far above the real loss."""
    window = min(100.0, num_steps / 50)
    return 0.0 if window <= 2 else 1 - 1 / window


def ema(values, beta):
    """Exponential moving average, bias-corrected (as Adam) so it starts at the first value."""
    out, s = [], 0.0
    for t, v in enumerate(values, 1):
        s = beta * s + (1 - beta) * v
        out.append(s / (1 - beta ** t))
    return out


def labels_for(paths):
    """The folder name of each log; the folder path where two names would be the same."""
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if len(set(names)) < len(names):
        names = [os.path.dirname(p) or "." for p in paths]
    return names


def summary(label, data):
    def best(kind, pick):
        steps, values = data[kind]
        if not values:
            return "-"
        i = values.index(pick(values))
        return f"{values[i]:.4f} (step {steps[i]})"
    return (f"{label}: min train loss {best('train', min)}, min val loss {best('val', min)}, "
            f"max HellaSwag {best('hella', max)}")


def loss_axis(runs):
    """(low, high, draw GPT-2's line?) of the loss panel. The first 2% of the steps (loss ~11
    at step 0) would flatten the rest: the axis starts at the highest loss after them. GPT-2's
    val loss is drawn once a run comes within 1.0 of it: a short run's loss of 6 and a line at
    3.3 would squash the curve. (None, None, False) without finite losses."""
    points = [(s, v) for _, d in runs for k in ("train", "val") for s, v in zip(*d[k]) if math.isfinite(v)]
    if not points:
        return None, None, False
    last = max(s for s, _ in points)
    low, high = min(v for _, v in points), max(v for s, v in points if s >= 0.02 * last)
    reference = low < GPT2_VAL_LOSS + 1.0
    return min(low, GPT2_VAL_LOSS) - 0.1 if reference else low - 0.1, high + 0.1, reference


def plot(runs, out, smooth):
    """runs: [(label, data)]; writes one PNG with two panels."""
    import matplotlib
    matplotlib.use("Agg")  # headless: no display needed on a GPU node
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 6))
    for i, (label, data) in enumerate(runs):
        color = f"C{i}"
        steps, train = data["train"]
        if train:
            beta = auto_smoothing(len(train)) if smooth is None else smooth
            if beta > 0:  # the raw curve stays visible under the smoothed one
                ax1.plot(steps, train, color=color, alpha=0.35, linewidth=0.8,
                         label=f"{label} train loss (raw)")
            smoothed = ema(train, beta) if beta > 0 else train
            ax1.plot(steps, smoothed, color=color, label=f"{label} train loss" +
                     (f" (EMA {beta:.3g})" if beta > 0 else ""))
        steps, val = data["val"]
        if val:
            ax1.plot(steps, val, color=color, linestyle="--", marker=".", label=f"{label} val loss")
        steps, hella = data["hella"]
        if hella:
            ax2.plot(steps, hella, color=color, marker=".", label=f"{label} HellaSwag")
    low, high, reference = loss_axis(runs)
    if reference:
        ax1.axhline(GPT2_VAL_LOSS, color="r", linestyle=":", label="OpenAI GPT-2 (124M) val loss")
    if low is not None:
        ax1.set_ylim(low, high)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("Loss")
    ax1.legend()
    ax2.axhline(0.25, color="gray", linestyle=":", label="chance (1 in 4)")
    ax2.axhline(GPT2_HELLA, color="r", linestyle=":", label="OpenAI GPT-2 (124M)")
    ax2.axhline(GPT3_HELLA, color="g", linestyle=":", label="OpenAI GPT-3 (124M)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy (acc_norm)")
    ax2.set_title("HellaSwag eval")
    ax2.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def smoothing(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def main(argv=None):
    from fineweb import OneLineParser  # the project's one-line errors (fineweb imports no torch)
    parser = OneLineParser(description="Plot train/val loss and HellaSwag from log.txt")
    parser.add_argument("logs", nargs="*", default=["log/log.txt"], metavar="LOG",
                        help="log.txt files of train_gpt2.py, or their folders (default: log/log.txt)")
    parser.add_argument("--out", help="PNG to write (default: next to the first log, .png)")
    parser.add_argument("--smooth", type=smoothing, default=None,
                        help="EMA factor for the train loss, in [0, 1), 0: none (default: auto, "
                             "from the run's length: none under 100 steps, 0.99 for the full run)")
    args = parser.parse_args(argv)
    try:
        # a run's folder (e.g. log_demo) stands for its log.txt
        logs = [os.path.join(p, "log.txt") if os.path.isdir(p) else p for p in args.logs]
        runs = list(zip(labels_for(logs), [parse_log(p) for p in logs]))
        out = args.out or os.path.splitext(logs[0])[0] + ".png"
        for label, data in runs:
            print(summary(label, data))
        plot(runs, out, args.smooth)
    except (LogError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
