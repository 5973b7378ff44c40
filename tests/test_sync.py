"""
The training step never waits for the host between log lines. train.py's own loop runs (the script itself, as a
user runs it) under a TorchDispatchMode that records every op that reads a value back to the host: .item() and
every other aten._local_scalar_dense, .tolist() / .numpy() / .cpu() (which dispatch nothing on the CPU, so they are
wrapped), nonzero, boolean-mask indexing, aten.equal, is_nonzero, bincount, unique, masked_select, and
repeat_interleave without output_size. Each read is charged to the line of train.py's loop it came from: the
step's lines must have none but those that are by design (BY_DESIGN), a log line its few (docs/training.md names
them all). On the CPU the device and the host are one, so the reads of tensors that live on the host on every device
(HOST_TENSORS: the batch being drawn, the DRE's draw of its steps, the optimizer's step counts) are named, with why.
"""

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
ATEN_READS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "bincount", "unique_dim", "_unique2",
              "unique_consecutive", "masked_select"}
# reads that are not syncs on a GPU either: tensors the code builds on the host on every device
HOST_TENSORS = {("train.py", "get_batch"): "batches are drawn on the host and copied to the device (non-blocking)",
                ("reasoning.py", "sample_steps"): "the DRE draws its core steps from a CPU table (train_distribution)",
                ("torch/optim/optimizer.py", "_get_value"): "the optimizer's step counts: torch keeps them on the host "
                "unless fused or capturable (parameter by parameter, as under expert parallelism, it reads them)"}
# the 'loop' kernel reads the group sizes (one .tolist() per GEMM): by design, it is the CPU's path; 'auto' never
# picks it on a GPU (docs/moe.md)
LOOP_KERNEL = ("gemm_kernels/__init__.py", "_grouped_mm_loop")


class HostReads(TorchDispatchMode):
    """Records each host read: the op, the line of train.py's top level it came from, the repository's frames
    (stack) and torch's (torch), innermost first."""

    def __init__(self):
        super().__init__()
        self.reads, self.patched = [], {}

    def record(self, op):
        frame, stack, torch_stack, line = sys._getframe(1), [], [], None
        while frame is not None:
            path, name = os.path.relpath(frame.f_code.co_filename, ROOT), frame.f_code.co_name
            if "/torch/" in frame.f_code.co_filename:
                torch_stack.append(("torch/" + frame.f_code.co_filename.split("/torch/", 1)[1], name))
            elif not path.startswith(("..", "tests")):
                stack.append((path, name, frame.f_lineno))
                if path == "train.py" and name == "<module>":
                    line = frame.f_lineno
            frame = frame.f_back
        self.reads.append({"op": op, "line": line, "stack": stack, "torch": torch_stack})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        masks = [t for t in (args[1] if name in ("index", "index_put", "index_put_") else ())
                 if isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)]
        repeats = args[min(1, len(args) - 1)] if name == "repeat_interleave" else None  # (repeats) or (self, repeats)
        if name in ATEN_READS or masks or (isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None):
            self.record(f"aten.{name}" + " (boolean mask)" * bool(masks))
        return func(*args, **kwargs)

    def __enter__(self):
        for method in ("tolist", "numpy", "cpu"):  # on a CUDA tensor each is a copy to the host
            original = self.patched[method] = getattr(torch.Tensor, method)

            def wrapper(t, *a, _method=method, _original=original, **k):
                self.record(f".{_method}()")
                return _original(t, *a, **k)
            setattr(torch.Tensor, method, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self.patched.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)


def run_train_recorded(args):
    """train.py as `python train.py ARGS` runs it, in this process, under HostReads: the list of reads."""
    sys.argv = [TRAIN, *args]
    with HostReads() as recorder:
        try:
            runpy.run_path(TRAIN, run_name="__main__")
        except SystemExit as e:
            assert not e.code, f"train.py exited with {e.code}"
    return recorder.reads


def loop_lines():
    """Line numbers in train.py: (the loop's first, {line: what it is} for the lines at log and eval intervals: the
    evaluation's block whole, the log line's reads by name)."""
    with open(TRAIN) as f:
        lines = f.read().splitlines()
    at = lambda text: next(i + 1 for i, line in enumerate(lines) if text in line)
    evaluation = {i: "eval" for i in range(at("    if evaluate:"), at("    if iter_num >= max_iters:"))}
    return at("while True:"), {**evaluation, at("stop_requested, bad = agree("): "agree",
                               at("feature_logs(stats_sum, moe_loss_sum)"): "feature_logs",
                               at("lossf = loss_sum.item()"): "loss"}


def step_reads(reads):
    """The reads in the loop that are not at a log or eval line, nor of host tensors (HOST_TENSORS)."""
    start, logged = loop_lines()
    return [r for r in reads if r["line"] is not None and r["line"] >= start and r["line"] not in logged
            and not any(tuple(frame[:2]) in HOST_TENSORS for frame in r["stack"] + r["torch"])]


def log_reads(reads):
    """{what: how many} of the reads at a log line."""
    _, logged = loop_lines()
    kinds = [logged[r["line"]] for r in reads if logged.get(r["line"], "eval") != "eval"]
    return {kind: kinds.count(kind) for kind in set(kinds)}


TINY = ["--dataset=shakespeare_char", "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=1", "--eval_interval=1000", "--warmup_iters=2", "--lr_decay_iters=100",
        "--max_iters=4", "--log_interval=2", "--gradient_accumulation_steps=2", "--grad_clip=1.0", "--peak_flops=1e12"]
ITERS, LOG_INTERVAL, MICRO_STEPS, LAYERS = 4, 2, 2, 2
MOE = ["--n_expert=4", "--top_k=2", "--expert_hidden=32", "--capacity_factor=1.25", "--moe_balance=bias"]
DRE = ["--n_layer=3", "--dre=True", "--max_reasoning_steps=4", "--dre_sample_steps=True", "--dre_mean_steps=2.0",
       "--dre_backprop_steps=2", "--n_prelude=1", "--n_coda=1"]
CASES = {"dense": ["--dtype=float32"],
         "moe-loop": ["--dtype=float32", *MOE, "--moe_kernel=loop"],
         "moe-grouped_mm": ["--dtype=bfloat16", *MOE, "--moe_kernel=grouped_mm", "--grad_checkpoint=True"],
         "dre": ["--dtype=float32", *DRE]}
# under torchrun, 2 ranks: data parallel, and expert parallel (whose all_to_all split sizes must be read)
TORCHRUN_CASES = {"ddp": ["--dtype=float32"],
                  "moe-ep2": ["--dtype=bfloat16", *MOE, "--moe_kernel=grouped_mm", "--ep_size=2"]}
# what reads by design, per (file, function) that reads: how many per MoE layer per micro-step
BY_DESIGN = {"moe-loop": (LOOP_KERNEL, 2),  # the group sizes of each of its two GEMMs (backward keeps them)
             "moe-ep2": (("moe.py", "forward"), 1)}  # ExpertsEP: the rows to send and to receive, as ints


def check(reads, case, rank=0, micro_steps=MICRO_STEPS):
    """The step's reads: none but BY_DESIGN's; a log line's: agree's one (at evaluations too), the loss's one on rank
    0, and one for all MoE layers, their metrics and MoE loss together."""
    step, (where, per_layer) = step_reads(reads), BY_DESIGN.get(case, ((None, None), 0))
    designed = [r for r in step if tuple(r["stack"][0][:2]) == where]
    assert len(designed) == per_layer * LAYERS * micro_steps * ITERS, (case, len(designed))
    assert not [r for r in step if r not in designed], f"{case}: host reads in the step:\n" + "\n".join(
        f"{r['op']} at {r['stack'][:4]}" for r in step if r not in designed)
    logs = ITERS // LOG_INTERVAL
    want = {"agree": logs + 1} | ({"loss": logs} if rank == 0 else {}) | ({"feature_logs": logs} if "moe" in case
                                                                         else {})
    assert log_reads(reads) == want, (case, rank)


def test_the_recorder_sees_each_kind_of_host_read_and_nothing_else():
    t, counts = torch.arange(4.0), torch.tensor([1, 2, 0, 1])
    with HostReads() as recorder:
        t.tolist(), t.numpy(), t.cpu(), t[1].item(), bool(t[1] > 0), t.nonzero(), t[t > 1], torch.equal(t, t)
        counts.repeat_interleave(counts), torch.bincount(counts), counts.unique(), t.masked_select(t > 1)
        # none of these waits for the host on a GPU
        t.sum(), t.topk(2), counts.repeat_interleave(counts, output_size=4), counts.repeat_interleave(2), t[counts]
        counts.argsort(stable=True), t.index_select(0, counts), t.nonzero_static(size=4)
    assert [r["op"] for r in recorder.reads] == [
        ".tolist()", ".numpy()", ".cpu()", "aten._local_scalar_dense", "aten._local_scalar_dense", "aten.nonzero",
        "aten.index (boolean mask)", "aten.equal", "aten.repeat_interleave", "aten.bincount", "aten._unique2",
        "aten.masked_select"]
    assert all(getattr(torch.Tensor, m) is f for m, f in recorder.patched.items())  # put back on exit


@pytest.fixture(scope="module")
def one_process_reads(char_data, tmp_path_factory):
    """Every CASES run of train.py, one after another in one process (tests/test_sync.py --cases): one fork, the
    imports paid once (~15 CPU seconds in all)."""
    from conftest import run_script
    out = tmp_path_factory.mktemp("reads")
    run_script("tests/test_sync.py", ["--cases", out], char_data)
    return {case: json.loads((out / f"{case}-0.json").read_text()) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_no_host_read_between_log_lines(case, one_process_reads):
    check(one_process_reads[case], case)


@pytest.mark.slow  # a torchrun launch: ~20 CPU seconds
def test_no_host_read_between_log_lines_on_two_ranks(char_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "tests", "test_sync.py"), "--torchrun", str(tmp_path)],
                          cwd=char_data, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for case in TORCHRUN_CASES:
        for rank in range(2):
            # (the step's micro-batches shared out: one per rank)
            check(json.loads((tmp_path / f"{case}-{rank}.json").read_text()), case, rank, MICRO_STEPS // 2)


def run_cases(cases, out_dir):
    """train.py once per case in this process, its reads written to out_dir/<case>-<rank>.json. Under torchrun one
    process group serves them all: train.py joins the one the first run made, and its exit leaves it for the next."""
    import parallel
    import torch.distributed as dist
    init_distributed, rank = parallel.init_distributed, int(os.environ.get("RANK", 0))

    def join(device, backend="auto"):
        if not dist.is_initialized():
            return init_distributed(device, backend)
        return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size(), device

    def leave(code=0):
        if dist.is_initialized():
            dist.barrier()
        raise SystemExit(code)
    parallel.init_distributed, parallel.exit_process = join, leave
    for case, args in cases.items():
        reads = run_train_recorded([*TINY, *args, f"--out_dir={os.path.join(out_dir, case)}"])
        with open(os.path.join(out_dir, f"{case}-{rank}.json"), "w") as f:
            json.dump(reads, f)
    parallel.teardown()


if __name__ == "__main__":
    # python tests/test_sync.py --cases OUT_DIR, or under torchrun (2 ranks) tests/test_sync.py --torchrun OUT_DIR
    sys.path.insert(0, ROOT)
    run_cases(TORCHRUN_CASES if sys.argv[1] == "--torchrun" else CASES, sys.argv[2])
