"""
Plots the metrics.jsonl that train.py writes (MetricsLog, below) into each run's out_dir as one PNG: train and val loss
against iterations and against training time, and the MoE load balance and DRE core steps when a run logged them.
Several runs are overlaid, each labelled with its directory:

    python plot.py out-shakespeare-char                       # writes out-shakespeare-char/metrics.png
    python plot.py out-shakespeare-char out-shakespeare-char-moe --out=moe_vs_dense.png

Training time adds up the logged milliseconds per iteration, so evaluation is left out and a resumed run carries on
from where its checkpoint was. train.py appends to metrics.jsonl, so a file may hold several runs: records without a
loss (a run-start marker) are skipped, and where the iterations go back (a new run, or a resume from an earlier
checkpoint) the new records replace the old from that iteration on, so what is plotted is the newest run's history.
Needs matplotlib (pip install matplotlib), which nothing else in nanothink does.
"""

import argparse
import json
import os
import sys


class MetricsLog:
    """train.py's log: a JSON line a record in out_dir/metrics.jsonl: `first`, then each logged (to wandb too)."""

    def __init__(self, out_dir, first, wandb=None):
        self.file, self.wandb = open(os.path.join(out_dir, "metrics.jsonl"), "a"), None
        self(first)
        self.wandb = wandb

    def __call__(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])


def read_metrics(path):
    """The records of a metrics.jsonl (a run directory or the file itself); ValueError says what is wrong with it."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: give a run directory (train.py's out_dir) that holds metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # no newline yet: a line train.py is still writing
                break
            raise ValueError(f"{path}:{lineno}: not a JSON record ({e.msg} at column {e.colno})") from None
    return records


def kind(record):
    return "eval" if "val_loss" in record else "step" if "loss" in record else None


def history(records):
    """The newest run's training-step and evaluation records, in order, each with "time": seconds of training up to
    it. A record at iteration i replaces those after i, and the one of its own kind at i."""
    kept = []
    for r in records:
        i = r.get("iter") if isinstance(r, dict) else None
        if not isinstance(i, int):
            continue
        while kept and (kept[-1]["iter"] > i or kept[-1]["iter"] == i and kind(kept[-1]) == kind(r)):
            kept.pop()
        if kind(r):
            kept.append(r)
    seconds, last = 0.0, 0
    for r in kept:
        if kind(r) == "step":  # "ms" is the mean over the iterations since the previous step record
            seconds += r.get("ms", 0.0) / 1000 * (r["iter"] - last)
            last = r["iter"]
        r["time"] = seconds
    return kept


def draw(ax, records, x, y, **style):
    """A line through the records that have a value for y (a key, or a function of the record), if any do."""
    pts = [(r[x], y(r) if callable(y) else r[y]) for r in records if (callable(y) and y(r) is not None) or y in r]
    if pts:
        ax.plot(*zip(*pts), **style)


def moe_balance(r):  # the worst layer's load balance (1 is perfect)
    return min(m["balance"] for m in r["moe"]) if r.get("moe") else None


def dre_steps(r):  # core steps drawn per micro-batch in training, or taken per token at evaluation
    if r.get("dre_steps"):
        return sum(r["dre_steps"]) / len(r["dre_steps"])
    return r["val_dre"].get("mean_steps") if isinstance(r.get("val_dre"), dict) else None


def figure(runs):
    """A matplotlib figure of runs, a list of (label, history(...))."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    panels = [("loss against iterations", "iter", "iteration"), ("loss against training time", "time", "seconds")]
    steps = [r for _, h in runs for r in h if kind(r) == "step"]
    if any(moe_balance(r) is not None for r in steps):
        panels.append(("MoE load balance, worst layer (1 is even)", "iter", "iteration"))
    if any(dre_steps(r) is not None for _, h in runs for r in h):
        panels.append(("DRE core steps", "iter", "iteration"))
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), squeeze=False)
    for ax, (title, x, xlabel) in zip(axes.flat, panels):
        ax.set(title=title, xlabel=xlabel)
        ax.grid(alpha=0.3)
        for n, (label, h) in enumerate(runs):
            color = f"C{n}"
            step, evals = [r for r in h if kind(r) == "step"], [r for r in h if kind(r) == "eval"]
            if title.startswith("loss"):
                draw(ax, step, x, "loss", color=color, alpha=0.35, linewidth=1, label=f"{label} train")
                draw(ax, evals, x, "val_loss", color=color, marker="o", markersize=3, label=f"{label} val")
            elif title.startswith("MoE"):
                draw(ax, step, x, moe_balance, color=color, label=label)
            else:
                draw(ax, step, x, dre_steps, color=color, alpha=0.5, linewidth=1, label=f"{label} train (drawn)")
                draw(ax, evals, x, dre_steps, color=color, marker="o", markersize=3, label=f"{label} val (halted)")
        ax.legend(fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description="train/val loss curves of runs' metrics.jsonl as a PNG")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (train.py's out_dir)")
    parser.add_argument("--out", help="the PNG to write; default RUN_DIR/metrics.png for one run, else ./metrics.png")
    args = parser.parse_args(argv)
    runs = []
    for path in args.runs:
        try:
            h = history(read_metrics(path))
        except ValueError as e:
            sys.exit(f"error: {e}")
        if not h:
            sys.exit(f"error: {path} holds no loss records yet (train.py writes one every log_interval iterations)")
        runs.append((os.path.basename(os.path.normpath(path)) or path, h))
    if len({label for label, _ in runs}) < len(runs):  # two runs of one name: tell them apart by their paths
        runs = [(os.path.normpath(path), h) for path, (_, h) in zip(args.runs, runs)]
    run_dir = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0])
    out = args.out or (os.path.join(run_dir, "metrics.png") if len(runs) == 1 else "metrics.png")
    try:
        fig = figure(runs)
    except ImportError:
        sys.exit("error: plot.py needs matplotlib: pip install matplotlib")
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        sys.exit(f"error: cannot write {out} ({e.strerror}); pick another --out")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
