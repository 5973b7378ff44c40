"""What happens when things go wrong in a run: a rank killed under torchrun --max-restarts (the group resumes and
its losses are the uninterrupted run's, bit for bit), a rank that fails (every rank stops promptly, with its
message), a checkpoint write that fails or is slow, SIGTERM / Ctrl-C (one: save after the step; two: quit at once),
and keep_last. Faults are injected by a wrapper that patches train.py's world before running it, as torchrun would."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import ROOT, run_train
from checkpoint import read_checkpoint

TINY = ["--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=2",
        "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2", "--log_interval=1",
        "--warmup_iters=2", "--lr_decay_iters=100", "--learning_rate=3e-3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train_records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["iter"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def ckpt_iter(out_dir, name="ckpt.pt"):
    return torch.load(os.path.join(out_dir, name), weights_only=True)["iter_num"]


def faulty(tmp_path, patch):
    """A script that applies `patch` (test code injecting a fault; RANK is this process's rank) and then runs
    train.py with the same arguments."""
    path = tmp_path / "faulty_train.py"
    path.write_text(f"import os, runpy, sys, time\nsys.path.insert(0, {ROOT!r})\nimport torch\nimport model\n"
                    f"RANK = int(os.environ.get('RANK', 0))\n{textwrap.dedent(patch)}\n"
                    f"sys.argv[0] = {os.path.join(ROOT, 'train.py')!r}\n"
                    f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return str(path)


def torchrun(script, args, *launcher):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *launcher, script,
            *args]


def start(cmd, cwd, log):
    """The command in its own session (a process group, as a terminal's foreground job), output to `log`."""
    return subprocess.Popen(cmd, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=True)


def wait_for(condition, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def logged_past(out_dir, it):
    return lambda: os.path.exists(os.path.join(out_dir, "metrics.jsonl")) and \
        any(i >= it for i, _ in train_records(out_dir))


def worker_pid(agent_pid, rank):
    """The pid of torchrun's worker with this RANK (its children, found in /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under pid {agent_pid}")


@pytest.mark.slow
def test_elastic_restart_after_a_killed_rank_resumes_and_matches_an_uninterrupted_run(char_data, tmp_path):
    # dropout on: the restarted ranks must restore the random streams too; fsdp: both starts are on `meta`, the
    # restart loading each rank's shards straight into it
    args = [*TINY, "--dropout=0.1", "--max_iters=40", "--eval_interval=5", "--parallel=fsdp"]
    train = os.path.join(ROOT, "train.py")
    whole = subprocess.run(torchrun(train, [*args, f"--out_dir={tmp_path / 'whole'}"]), cwd=char_data, env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]
    out = tmp_path / "elastic"
    proc = start(torchrun(train, [*args, f"--out_dir={out}"], "--max-restarts=1"), char_data, tmp_path / "log")
    wait_for(logged_past(out, 8))  # after the checkpoint of iteration 5
    os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, (tmp_path / "log").read_text()[-3000:]
    records, reference = train_records(out), dict(train_records(tmp_path / "whole"))
    log = (tmp_path / "log").read_text()
    assert "torchrun restart 1: resuming" in log, log[-3000:]
    # from a checkpoint taken mid-run (iterations after it, if any, ran twice: before the kill and after)
    resumed = [int(i) for i in re.findall(r"from iter (\d+) \(best val loss", log)]
    assert len(resumed) == 1 and 5 <= resumed[0] < 40, log[-3000:]
    assert sorted({i for i, _ in records}) == list(range(1, 41))
    for it, loss in records:  # before the kill and after the restart alike: bitwise
        assert loss == reference[it], (it, loss, reference[it])
    assert ckpt_iter(out, os.path.join("ckpt_dcp", "meta.pt")) == 40


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_promptly_with_its_message(char_data, tmp_path):
    stamp = tmp_path / "failed_at"
    script = faulty(tmp_path, f"""
        if RANK == 1:  # the 6th forward (after the 4 of the first evaluation) raises
            forward, calls = model.GPT.forward, []
            def failing(self, *args, **kwargs):
                calls.append(1)
                if len(calls) == 6:
                    open({str(stamp)!r}, "w").write(str(time.time()))
                    raise RuntimeError("injected failure on rank 1")
                return forward(self, *args, **kwargs)
            model.GPT.forward = failing
    """)
    proc = subprocess.run(torchrun(script, [*TINY, f"--out_dir={tmp_path / 'out'}", "--max_iters=100000",
                                            "--eval_interval=100000"]),
                          cwd=char_data, env=ENV, capture_output=True, text=True, timeout=600)
    ended = time.time()
    assert proc.returncode != 0
    assert ended - float(stamp.read_text()) < 60
    assert "error: rank 1 failed: RuntimeError: injected failure on rank 1" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_failed_checkpoint_write_stops_every_rank_and_keeps_the_previous_one(char_data, tmp_path):
    script = faulty(tmp_path, """
        if RANK == 0:  # the second checkpoint write finds the disk full
            save, calls = torch.save, []
            def full_disk(*args, **kwargs):
                calls.append(str(args[1]).endswith(".tmp"))  # (all_gather_object pickles with torch.save)
                if calls.count(True) == 2 and calls[-1]:
                    raise OSError(28, "No space left on device")
                return save(*args, **kwargs)
            torch.save = full_disk
    """)
    out = tmp_path / "out"
    proc = subprocess.run(torchrun(script, [*TINY, f"--out_dir={out}", "--max_iters=8", "--eval_interval=2"]),
                          cwd=char_data, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: could not write" in proc.stdout and "No space left on device" in proc.stdout, proc.stdout[-2000:]
    assert ckpt_iter(out) == 2


@pytest.mark.slow
def test_a_checkpoint_write_longer_than_the_collective_timeout_does_not_time_out_the_other_ranks(char_data,
                                                                                                tmp_path):
    # the default group times out after 3 s; rank 0 takes 8 s to write the second checkpoint
    script = faulty(tmp_path, """
        import datetime, torch.distributed as dist
        init = dist.init_process_group
        dist.init_process_group = lambda *a, **k: init(*a, **{**k, "timeout": datetime.timedelta(seconds=3)})
        if RANK == 0:
            save, calls = torch.save, []
            def slow(*args, **kwargs):
                calls.append(str(args[1]).endswith(".tmp"))  # (all_gather_object pickles with torch.save)
                if calls.count(True) == 2 and calls[-1]:
                    time.sleep(8)
                return save(*args, **kwargs)
            torch.save = slow
    """)
    out = tmp_path / "out"
    proc = subprocess.run(torchrun(script, [*TINY, f"--out_dir={out}", "--max_iters=6", "--eval_interval=2"]),
                          cwd=char_data, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert ckpt_iter(out) == 6


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_after_the_step_and_exits(char_data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start(torchrun(os.path.join(ROOT, "train.py"), [*TINY, f"--out_dir={out}", "--max_iters=100000",
                                                           "--eval_interval=100000"]), char_data, log)
    wait_for(logged_past(out, 3))
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C; torchrun forwards it to the workers
    proc.wait(timeout=120)
    text = log.read_text()
    assert "stopping: a checkpoint will be saved after this step" in text, text[-3000:]
    stopped_at = int(text.split("stopped by signal at iter ")[1].split()[0])
    assert ckpt_iter(out) == stopped_at >= 3


def slow_second_save(tmp_path):
    """train.py whose second checkpoint write (the one a signal asks for) takes a minute, as a big model's would."""
    return faulty(tmp_path, """
        save, calls = torch.save, []
        def slow(*args, **kwargs):
            calls.append(str(args[1]).endswith(".tmp"))  # (all_gather_object pickles with torch.save)
            if calls.count(True) == 2 and calls[-1]:
                time.sleep(60)
            return save(*args, **kwargs)
        torch.save = slow
    """)


def run_until_signalled(char_data, tmp_path, *extra):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start([sys.executable, slow_second_save(tmp_path), *TINY, f"--out_dir={out}", "--max_iters=100000",
                  "--eval_interval=3", *extra], char_data, log)
    wait_for(logged_past(out, 5))  # checkpoint 3 is on disk
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping:" in log.read_text(), timeout=60)
    return proc, out, log


@pytest.mark.slow
def test_a_second_signal_quits_at_once_and_keeps_the_last_checkpoint(char_data, tmp_path):
    proc, out, log = run_until_signalled(char_data, tmp_path)
    time.sleep(0.5)  # inside the slow save
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    assert proc.wait(timeout=30) == 130
    assert time.time() - t0 < 10
    assert "second signal: quitting now, without saving; the last checkpoint (iter 3)" in log.read_text()
    assert ckpt_iter(out) == 3 and read_checkpoint(out / "ckpt.pt")["iter_num"] == 3


@pytest.mark.slow
def test_a_save_that_outlasts_stop_grace_says_so_and_keeps_the_last_checkpoint(char_data, tmp_path):
    proc, out, log = run_until_signalled(char_data, tmp_path, "--stop_grace=3")
    assert proc.wait(timeout=60) == 1
    assert "did not finish within stop_grace=3 s; exiting without saving; the last checkpoint (iter 3)" in \
        log.read_text().strip().splitlines()[-1]
    assert ckpt_iter(out) == 3


def test_keep_last_keeps_the_newest_checkpoints_and_resume_reads_memory_mapped(char_data, tmp_path):
    for name, keep in (("one", 1), ("three", 3)):
        run_train([*TINY, "--max_iters=8", "--eval_interval=2", f"--out_dir={tmp_path / name}", f"--keep_last={keep}"],
                  char_data, env=ENV)
    assert sorted(os.listdir(tmp_path / "one")) == ["ckpt.pt", "metrics.jsonl"]
    assert sorted(os.listdir(tmp_path / "three")) == ["ckpt-4.pt", "ckpt-6.pt", "ckpt.pt", "metrics.jsonl"]
    assert [ckpt_iter(tmp_path / "three", n) for n in ("ckpt-4.pt", "ckpt-6.pt", "ckpt.pt")] == [4, 6, 8]
    # a resumed run reads tensors straight from the file's pages (shared by the ranks of a node), not a copy
    path = str(tmp_path / "one" / "ckpt.pt")
    ckpt = read_checkpoint(path)
    address = ckpt["model"]["transformer.wte.weight"].data_ptr()
    with open("/proc/self/maps") as f:  # "start-end perms offset dev inode path" per mapping
        maps = [line.split() for line in f]
    backing = [m[5] for m in maps if len(m) == 6 and
               int(m[0].split("-")[0], 16) <= address < int(m[0].split("-")[1], 16)]
    assert backing == [path]
