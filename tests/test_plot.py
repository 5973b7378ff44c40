"""plot.py: which records of a metrics.jsonl it plots, where, and what it says about bad input."""
import json
import os
import struct
import subprocess
import sys

import pytest

import plot
from conftest import ROOT, run_train

pytest.importorskip("matplotlib")


def step(i, loss, ms=100.0, **extra):
    return {"iter": i, "loss": loss, "lr": 1e-3, "ms": ms, "tokens_per_sec": 1.0, "mfu": 0.1, "eta_s": 1.0, **extra}


def evaluation(i, val, **extra):
    return {"iter": i, "train_loss": val - 0.1, "val_loss": val, **extra}


def write(path, records, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def png_size(path):
    """(width, height) from the PNG signature and IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_history_is_the_newest_run_and_times_add_up_the_logged_steps():
    old = [{"run_start": "2026-12-01T10:00:00"}, evaluation(0, 4.0)] + [step(i, 3.0, ms=50) for i in range(1, 5)] \
        + [evaluation(4, 2.9)] + [step(i, 2.5, ms=50) for i in range(5, 9)] + [evaluation(8, 2.8)]
    # resumed from the checkpoint of iter 4: its records from iter 4 on replace the old ones
    resumed = [{"run_start": "2026-12-01T11:00:00", "resumed_from": 4}, evaluation(4, 2.9)] \
        + [step(i, 2.0, ms=200) for i in (6, 8)] + [evaluation(8, 2.1)]
    h = plot.history(old + resumed)
    assert [(r["iter"], plot.kind(r)) for r in h] == [(0, "eval"), (1, "step"), (2, "step"), (3, "step"), (4, "step"),
                                                     (4, "eval"), (6, "step"), (8, "step"), (8, "eval")]
    assert h[-1]["val_loss"] == 2.1 and h[-2]["loss"] == 2.0
    # 4 steps of 50 ms, then iterations 5-8 at 200 ms each (logged every two)
    assert [round(r["time"], 6) for r in h] == [0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.6, 1.0, 1.0]
    fresh = [evaluation(0, 4.1), step(1, 3.9)]  # a new run in the same file starts again at iteration 0
    assert plot.history(old + fresh) == fresh


def test_plot_draws_each_run_and_its_moe_and_dre_panels(tmp_path):
    moe = [{"balance": 0.9, "entropy_bits": 1.9}, {"balance": 0.7, "entropy_bits": 1.8}]
    a = [evaluation(0, 4.0), step(1, 3.5, moe=moe, dre_steps=[2, 4]), step(2, 3.0, moe=moe, dre_steps=[3, 3]),
         evaluation(2, 3.2, val_dre={"mean_steps": 2.5})]
    b = [evaluation(0, 4.2), step(2, 3.4, ms=300)]
    fig = plot.figure([("a", plot.history(a)), ("b", plot.history(b))])
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert sorted(axes) == ["DRE core steps", "MoE load balance, worst layer (1 is even)", "loss against iterations",
                            "loss against training time"]
    lines = {(title, line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for title, ax in axes.items() for line in ax.get_lines()}
    assert lines["loss against iterations", "a train"] == ([1, 2], [3.5, 3.0])
    assert lines["loss against iterations", "a val"] == ([0, 2], [4.0, 3.2])
    assert lines["loss against training time", "b train"] == ([0.6], [3.4])
    assert lines["MoE load balance, worst layer (1 is even)", "a"] == ([1, 2], [0.7, 0.7])
    assert lines["DRE core steps", "a train (drawn)"] == ([1, 2], [3.0, 3.0])
    assert lines["DRE core steps", "a val (halted)"] == ([2], [2.5])

    runs = [write(tmp_path / "a", a), write(tmp_path / "b", b)]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), *map(str, runs),
                           f"--out={tmp_path / 'both.png'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png_size(tmp_path / "both.png") == (1200, 840)  # 12 x 8.4 inches at 100 dpi: two rows of panels


def test_one_run_is_written_into_its_directory_and_a_half_written_line_is_skipped(tmp_path):
    run = write(tmp_path / "run", [evaluation(0, 4.0), step(1, 3.0)], tail='{"iter": 2, "lo')
    plot.main([str(run)])
    assert png_size(run / "metrics.png") == (1200, 420)  # the two loss panels only


@pytest.mark.parametrize("setup, message", [
    (lambda d: d, "run not found: give a run directory (train.py's out_dir) that holds metrics.jsonl"),
    (lambda d: d.mkdir() or d, "run/metrics.jsonl not found"),
    (lambda d: write(d, []), "holds no loss records yet"),
    (lambda d: write(d, [{"run_start": 1}]), "holds no loss records yet"),
    (lambda d: write(d, [step(1, 3.0)], tail="{oops\n" + json.dumps(step(2, 2.0)) + "\n"),
     "metrics.jsonl:2: not a JSON record"),
])
def test_bad_input_is_one_error_line(tmp_path, setup, message):
    run = setup(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        plot.main([str(run)])
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
    assert not (tmp_path / "run" / "metrics.png").exists()


def test_without_matplotlib_it_says_how_to_install_it(tmp_path):
    run = write(tmp_path / "run", [step(1, 3.0)])
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; "  # None: `import matplotlib` raises ImportError
            f"sys.argv = ['plot.py', {str(run)!r}]; runpy.run_path({os.path.join(ROOT, 'plot.py')!r}, "
            "run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: plot.py needs matplotlib: pip install matplotlib"


def test_plots_a_real_training_run(char_data, tmp_path):
    out = tmp_path / "run"
    run_train(["--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--n_layer=1", "--n_head=2",
               "--n_embd=16", "--block_size=16", "--batch_size=2", "--eval_iters=1", "--log_interval=1",
               f"--out_dir={out}", "--max_iters=4", "--eval_interval=2"], char_data)
    h = plot.history(plot.read_metrics(str(out)))
    assert [r["iter"] for r in h if plot.kind(r) == "eval"] == [0, 2, 4]
    assert [r["iter"] for r in h if plot.kind(r) == "step"] == [1, 2, 3, 4]
    assert all(a["time"] <= b["time"] for a, b in zip(h, h[1:])) and h[-1]["time"] > 0
    plot.main([str(out)])
    assert png_size(out / "metrics.png") == (1200, 420)
