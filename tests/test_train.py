"""train.py end to end, as a subprocess on a tiny model: it learns, resumes exactly, and never loses a checkpoint."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script, run_train

TINY = ["--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=2",
        "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2", "--log_interval=1",
        "--warmup_iters=2", "--lr_decay_iters=100", "--learning_rate=3e-3"]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def load(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def test_training_lowers_the_loss(char_data, tmp_path):
    run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=150", "--eval_interval=150", "--eval_iters=10",
               "--n_embd=64", "--block_size=64", "--batch_size=8", "--lr_decay_iters=150", "--min_lr=3e-4"], char_data)
    evals = [r for r in metrics(tmp_path) if "val_loss" in r]
    assert evals[0]["iter"] == 0 and evals[-1]["iter"] == 150
    assert evals[0]["val_loss"] > 4.0  # ~ln(65) before training
    assert evals[-1]["val_loss"] < 3.0, evals  # below the unigram entropy (~3.3 nats): it learned context
    # on the schedule it says: linear warmup over 2 steps, then a cosine from 3e-3 down to min_lr at step 150
    lrs = {r["iter"] - 1: r["lr"] for r in metrics(tmp_path) if "lr" in r}  # the lr of each step, 0..149
    assert sorted(lrs) == list(range(150))
    for it, lr in lrs.items():
        want = 3e-3 * (it + 1) / 3 if it < 2 else 3e-4 + 0.5 * (1 + math.cos(math.pi * (it - 2) / 148)) * 2.7e-3
        assert lr == pytest.approx(want, rel=1e-9), (it, lr, want)


def test_resume_is_bitwise_exact(char_data, tmp_path):
    # dropout on, so the resumed run must also restore the RNG that draws the dropout masks; the resume command
    # gives no other setting: every one comes from the checkpoint
    common = [*TINY, "--eval_interval=6", "--dropout=0.1"]
    run_train([*common, f"--out_dir={tmp_path / 'whole'}", "--max_iters=12"], char_data)
    run_train([*common, f"--out_dir={tmp_path / 'split'}", "--max_iters=6"], char_data)
    assert load(tmp_path / "split")["iter_num"] == 6
    # resumed as the README shows it: the run's own settings, but for the one asked to change (N2)
    proc = run_train(["--init_from=resume", f"--out_dir={tmp_path / 'split'}", "--max_iters=12"], char_data)
    assert "max_iters: 6 -> 12" in proc.stdout.splitlines(), proc.stdout[:2000]
    whole, split = train_losses(tmp_path / "whole"), train_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 13))
    for it in range(7, 13):
        assert split[it] == whole[it], (it, split[it], whole[it])  # bitwise, not approximately


def test_killed_save_leaves_previous_checkpoint_loadable(char_data, tmp_path):
    run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=4"], char_data)
    assert load(tmp_path)["iter_num"] == 4
    # resume, and die in the middle of writing the next checkpoint, as a kill -9 or a full disk would
    crash = (
        "import os, runpy, sys, torch\n"
        "def dying_save(obj, f, *a, **k):\n"
        "    with open(f, 'wb') as fh:\n"
        "        fh.write(b'half a checkpoint')\n"
        "    os._exit(9)\n"
        "torch.save = dying_save\n"
        f"sys.argv = [{os.path.join(ROOT, 'train.py')!r}] + sys.argv[1:]\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", crash, *TINY, f"--out_dir={tmp_path}", "--max_iters=8",
                           "--eval_interval=2", "--init_from=resume"], cwd=char_data, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    ckpt = load(tmp_path)
    assert ckpt["iter_num"] == 4
    # and the run resumes from it
    run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=6", "--eval_interval=2", "--init_from=resume"],
              char_data)
    assert load(tmp_path)["iter_num"] == 6


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(char_data, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--out_dir={tmp_path}", "--max_iters=100000",
           "--eval_interval=100000"]
    proc = subprocess.Popen(cmd, cwd=char_data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is training
        if os.path.exists(tmp_path / "metrics.jsonl") and len(train_losses(tmp_path)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in out
    ckpt = load(tmp_path)
    assert ckpt["iter_num"] >= 3
    assert ckpt["iter_num"] == max(train_losses(tmp_path))


def test_non_finite_loss_stops_without_overwriting_the_checkpoint(char_data, tmp_path):
    run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2"], char_data)
    before = os.path.getmtime(tmp_path / "ckpt.pt")
    # an absurd learning rate and no clipping blow the weights up within a few steps
    proc = run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=40", "--eval_interval=2", "--init_from=resume",
                      "--learning_rate=1e30", "--min_lr=1e30", "--grad_clip=0.0", "--warmup_iters=0"],
                     char_data, check=False)
    assert proc.returncode != 0
    assert "non-finite" in proc.stdout + proc.stderr
    assert os.path.getmtime(tmp_path / "ckpt.pt") == before
    assert load(tmp_path)["iter_num"] == 2


def test_wsd_schedule_micro_batch_mean_and_grad_clip_of_one_short_run(char_data, tmp_path):
    # one short run (rather than three) shows three things: the lr schedule, the loss of accumulated micro-batches
    # and the bound grad_clip puts on an AdamW step
    run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=10", "--eval_interval=5", "--lr_schedule=wsd",
               "--warmup_iters=2", "--lr_decay_iters=10", "--cooldown_frac=0.5", "--min_lr=1e-4", "--keep_last=2",
               "--gradient_accumulation_steps=2", "--batch_size=2", "--grad_clip=1e-9", "--weight_decay=0"],
              char_data)
    lrs = [r["lr"] for r in metrics(tmp_path) if "lr" in r]  # the lr of steps 0..9
    assert lrs[:2] == [3e-3 * 1 / 3, 3e-3 * 2 / 3]  # linear warmup
    assert lrs[2:6] == [3e-3] * 4  # stable until step 5 = 10 * (1 - 0.5)
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:]))  # then decaying linearly toward min_lr at step 10
    assert abs(lrs[9] - (3e-3 + 0.8 * (1e-4 - 3e-3))) < 1e-12
    # grad_clip=1e-9, far below AdamW's eps (1e-8), bounds a step: |update| = lr |m| / (sqrt(v) + eps) <= lr *
    # clip / eps, m being an average of clipped gradients. Unclipped, each of ~25k weights would move by ~lr
    w5, w10 = torch.load(tmp_path / "ckpt-5.pt", weights_only=True)["model"], load(tmp_path)["model"]
    moved = math.sqrt(sum((w10[k] - w5[k]).double().pow(2).sum() for k in w10))
    assert 0 < moved <= sum(lrs[5:]) * 1e-9 / 1e-8
    # so the model stays an untrained one, whose loss is ln(vocab): a step's loss is its micro-batches' mean
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 11)) and all(v == pytest.approx(math.log(65), rel=0.03)
                                                        for v in losses.values())


def test_sample_generates_from_a_checkpoint(char_data, tmp_path):
    run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2"], char_data)
    proc = run_script("sample.py", [f"--out_dir={tmp_path}", "--device=cpu", "--num_samples=2",
                                    "--max_new_tokens=40", "--start=ROMEO:"], char_data, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("ROMEO:") == 2
    assert "80 tokens in" in proc.stdout and "tokens/s" in proc.stdout


@pytest.mark.slow
def test_ddp_under_torchrun_trains_and_rank0_saves(char_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *TINY, f"--out_dir={tmp_path}", "--max_iters=6", "--eval_interval=6",
           "--gradient_accumulation_steps=2"]
    proc = subprocess.run(cmd, cwd=char_data, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("saved checkpoint") == 1  # rank 0 only
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 7)) and all(map(lambda v: v == v, losses.values()))
    assert load(tmp_path)["iter_num"] == 6
