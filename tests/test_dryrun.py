"""The dry run (dryrun.py, train.py --dry_run=N) against what it stands for: the same tracker's reading of real runs
on gloo ranks, a hand count of the bytes it must find, and train.py's command line."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, run_script

import dryrun
from model import GPT, GPTConfig

# a tiny model of each kind, and train.py's settings that the measurement reads
DENSE = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=32)
MOE = dict(DENSE, n_expert=4, top_k=2, expert_hidden=64, grad_checkpoint=True)
SMALL = dict(DENSE, n_layer=1)  # for the fast tests: a fake step costs about a millisecond an op
SETTINGS = dict(tp_size=1, pp_size=1, ep_size=1, pp_microbatches=0, dtype="auto", batch_size=4, block_size=32,
                optimizer="adamw", pp_schedule="1F1B", pp_virtual_stages=1, seed=1, fsdp_reshard_after_forward=True,
                weight_decay=0.1, learning_rate=1e-3, beta1=0.9, beta2=0.95, grad_clip=1.0, grad_checkpoint=False)
# (layout, tp_size, ranks, model[, pp_size]): every rank runs two micro-steps a step, so gradient accumulation is
# measured too
CASES = [("ddp", 1, 2, DENSE), ("fsdp", 1, 2, DENSE), ("tp", 2, 2, DENSE), ("fsdp+tp", 2, 4, MOE),
         ("fsdp", 1, 4, dict(DENSE, n_layer=4), 2)]


def settings(layout, tp_size, ranks, model, micro_steps=2, pp_size=1):
    dp = ranks // tp_size // pp_size
    return dict(SETTINGS, parallel=layout, tp_size=tp_size, gradient_accumulation_steps=micro_steps * dp,
                grad_checkpoint=model.get("grad_checkpoint", False), pp_size=pp_size)


def name(case):
    return case[0] + (f", pp {case[4]}" if len(case) > 4 else "")


def model_args(model):
    return dict(vars(GPTConfig(**model)))


def dry(layout, tp_size, ranks, model, pp_size=1):
    dryrun.fake_world(ranks)
    try:
        return dryrun.measure(model_args(model), settings(layout, tp_size, ranks, model, pp_size=pp_size), ranks)
    finally:
        dist.destroy_process_group()


def test_dry_run_counts_the_bytes_a_hand_count_gives():
    """fsdp over 4 fake ranks, fp32: each rank holds a quarter of the fp32 weights and of AdamW's two moments
    (FSDP pads each parameter to a multiple of the ranks), and the step's matmul FLOPs are 6 per parameter of the
    blocks and head per token, plus attention's (SDPA)."""
    dryrun.fake_world(4)
    try:
        s = dict(settings("fsdp", 1, 4, SMALL, micro_steps=1), dtype="float32")
        r = dryrun.measure(model_args(SMALL), s, 4)
    finally:
        dist.destroy_process_group()
    with torch.device("meta"):
        model = GPT(GPTConfig(**SMALL))
    shard = sum(math.ceil(p.shape[0] / 4) * p[0].numel() for p in model.parameters())
    assert r["peak"]["parameters"] == 4 * shard
    assert r["peak"]["optimizer"] == 8 * shard + 4 * len(list(model.parameters()))  # + each parameter's step
    tokens, T, L, C = s["batch_size"] * s["block_size"], s["block_size"], SMALL["n_layer"], SMALL["n_embd"]
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n)
    matmul += model.lm_head.weight.numel()  # tied: the embedding is also the head's matmul
    # attention: QK^T and AV forward, and in backward the scores again and four more products, each 2*T*C FLOPs a
    # token and layer (causal or not: flop_counter's count of SDPA)
    attention = 7 * 2 * L * T * C * tokens
    assert r["flops"] == pytest.approx(6 * matmul * tokens + attention, rel=0.02)


def test_dry_run_matches_a_real_one_process_run():
    """One gloo rank, in this process: the dry run's peak by category equals the same tracker's real reading."""
    dryrun.fake_world(1)
    try:
        expect = dryrun.measure(model_args(SMALL), settings("fsdp", 1, 1, SMALL), 1)
    finally:
        dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        real = dryrun.measure(model_args(SMALL), settings("fsdp", 1, 1, SMALL), 1, fake=False)
    finally:
        dist.destroy_process_group()
    assert expect["peak"] == pytest.approx(real["peak"], rel=0.05)
    assert expect["flops"] == real["flops"] and expect["collectives"] == real["collectives"]


def worker():
    """Under torchrun: every case of this world size, for real; rank 0 prints each one's figures as a JSON line."""
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    for case in CASES:
        layout, tp_size, ranks, model, pp_size = (*case, 1)[:5]
        if ranks == world:
            r = dryrun.measure(model_args(model), settings(layout, tp_size, ranks, model, pp_size=pp_size), ranks,
                               fake=False)
            if rank == 0:
                print(json.dumps({"layout": name(case), "peak": r["peak"], "total": r["total"]}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_dry_run_matches_real_gloo_ranks():
    """ddp, fsdp and tp on 2 gloo ranks, fsdp+tp (MoE, gradient checkpointing) and a 2-stage pipeline of fsdp pairs
    on 4, one torchrun per world size: rank 0's real peak, read by the same tracker, is within 5% of the dry run's,
    category by category, activations and temporaries as one (a pipeline's in total). Real ranks' collectives run
    in the background: when one ends can move a buffer alive at the peak from one of the two to the other (fsdp+tp,
    seen once in a background run: activations 0.46 MB dry, 0.38 real; temporaries 0.34, 0.44)."""
    real = {}
    for world in sorted({c[2] for c in CASES}):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={world}", __file__], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
        assert proc.returncode == 0, proc.stderr[-3000:]
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                real[r["layout"]] = r
    for case in CASES:
        expect = dry(*case)
        got = real[name(case)]
        print(name(case), "dry", expect["total"], expect["peak"], "real", got["total"], got["peak"])
        assert expect["total"] == pytest.approx(got["total"], rel=0.05), name(case)
        if len(case) > 4:  # a pipeline: which of its stages' buffers are alive at the real peak depends on the
            continue       # timing of the sends and receives (a loaded machine moved it); the total does not
        def categories(peak):
            peak = dict(peak)
            peak["activations"] = peak.get("activations", 0) + peak.pop("temporaries", 0)
            return peak
        want = categories(expect["peak"])
        for kind, value in categories(got["peak"]).items():
            assert want.get(kind, 0) == pytest.approx(value, rel=0.05, abs=2**16), (name(case), kind)


def test_train_dry_run_prints_memory_and_whether_it_fits(tmp_path):
    """train.py --dry_run=N as a user runs it, in a folder without data: the report, and the last line's verdict."""
    proc = run_script("train.py", ["--dry_run=4", "--parallel=fsdp", "--n_layer=1", "--n_head=4", "--n_embd=64",
                                   "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=4"], tmp_path,
                      check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("dry run: rank 0 of 4, parallel=fsdp")
    assert any(line.split()[0] == "optimizer" for line in lines)
    assert lines[-1].startswith("fits: ") and "of 80 GiB per GPU" in lines[-1]
    assert not os.listdir(tmp_path)  # nothing written


def test_dry_run_that_does_not_fit_names_the_setting_that_would():
    """A limit just under the peak: the verdict names the first setting that brings it under (gradient
    checkpointing), with that setting's own dry-run figure."""
    s = settings("fsdp", 1, 2, SMALL, micro_steps=1)
    dryrun.fake_world(2)
    try:
        peak = dryrun.measure(model_args(SMALL), s, 2)["total"] / 2**30
    finally:
        dist.destroy_process_group()
    lines = []
    assert dryrun.run(s, model_args(SMALL), 2, peak * 0.99, say=lines.append) == 1
    assert ["total", f"{peak:.2f}"] in [line.split() for line in lines]
    verdict, fits_with = lines[-1].split("; it fits with --grad_checkpoint=True (")
    assert verdict == f"does not fit: {peak:.1f} GiB per GPU, {peak * 0.99:g} GiB available"
    assert float(fits_with.split()[0]) <= peak * 0.99


def test_what_cannot_be_dry_run_is_named():
    with pytest.raises(ValueError, match="ep_size"):
        dryrun.run(dict(settings("fsdp", 1, 2, DENSE), ep_size=2), model_args(DENSE), 2, 80)
    # an fp32 MoE's expert loop reads its group sizes on the host: one line that says so, no traceback
    moe = dict(SMALL, n_expert=4, top_k=2, expert_hidden=64)
    with pytest.raises(ValueError, match="do not run under fake tensors: DataDependentOutputException"):
        dryrun.run(dict(settings("fsdp", 1, 2, moe), dtype="float32"), model_args(moe), 2, 80)
    assert not dist.is_initialized()


def test_a_start_that_cannot_fit_is_refused_before_it_allocates(monkeypatch):
    """fsdp over 4 ranks of one CPU node: each first builds the whole model (4 bytes a parameter; not when it
    starts on `meta`), then holds a quarter of 16 bytes a parameter; the node's available memory is shared by its 4
    ranks."""
    with torch.device("meta"):
        n = GPT(GPTConfig(**SMALL)).num_params(non_embedding=False)
    s = settings("fsdp", 1, 4, SMALL)
    need = max(4 * n, 16 * n / 4)
    monkeypatch.setattr(dryrun, "host_memory", lambda: 4 * need * 1.01)
    assert dryrun.start_check(model_args(SMALL), s, 4, "cpu", 4) is None
    monkeypatch.setattr(dryrun, "host_memory", lambda: 4 * need * 0.99)
    message = dryrun.start_check(model_args(SMALL), s, 4, "cpu", 4)
    assert message.startswith(f"error: this run needs at least {need / 2**30:.1f} GiB per rank ")
    assert f"but has {need * 0.99 / 2**30:.1f} GiB (available host memory shared by 4 ranks)" in message
    # ddp holds it all on every rank
    s = settings("ddp", 1, 4, SMALL)
    monkeypatch.setattr(dryrun, "host_memory", lambda: 4 * 16 * n * 0.99)
    assert f"needs at least {16 * n / 2**30:.1f} GiB" in dryrun.start_check(model_args(SMALL), s, 4, "cpu", 4)
    # on 8 ranks started on `meta` (train.py's fsdp start), none builds the whole model: an eighth of 16 bytes
    s = settings("fsdp", 1, 8, SMALL)
    monkeypatch.setattr(dryrun, "host_memory", lambda: 8 * 2 * n * 1.01)
    assert dryrun.start_check(model_args(SMALL), dict(s, on_meta=True), 8, "cpu", 8) is None
    assert f"needs at least {4 * n / 2**30:.1f} GiB" in dryrun.start_check(model_args(SMALL), s, 8, "cpu", 8)


@pytest.mark.slow
def test_train_refuses_a_run_that_cannot_fit_in_one_line(tmp_path):
    """torchrun with 2 ranks of a model no machine holds (6 TB): one `error:` line for the job, exit 1, nothing
    allocated."""
    (tmp_path / "data" / "tokens").mkdir(parents=True)
    for split in ("train", "val"):
        np.arange(4096, dtype=np.uint16).tofile(tmp_path / "data" / "tokens" / f"{split}.bin")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), "--device=cpu", "--dataset=tokens", "--n_layer=8",
                           "--n_head=64", "--n_embd=65536", "--block_size=64"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: this run needs at least "), proc.stdout + proc.stderr
    assert "(available host memory shared by 2 ranks)" in errors[0]


def test_weights_are_read_from_a_distributed_checkpoint_without_the_optimizer_state(tmp_path, monkeypatch):
    """checkpoint.read_sharded_weights: the model's tensors, equal to those saved, and no byte of the optimizer's
    read (nor anything written: the whole checkpoint used to be converted to a temporary ckpt.pt first)."""
    import torch.distributed.checkpoint as dcp
    from checkpoint import read_sharded_weights
    model = GPT(GPTConfig(**SMALL))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    opt.step()
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(tmp_path), no_dist=True)
    files, read = sorted(os.listdir(tmp_path)), []
    real_read = dcp.FileSystemReader.read_data
    monkeypatch.setattr(dcp.FileSystemReader, "read_data", lambda self, plan, planner: (
        read.extend(item.storage_index.fqn for item in plan.items), real_read(self, plan, planner))[1])
    weights = read_sharded_weights(str(tmp_path))
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert read and all(fqn.startswith("model.") for fqn in read)
    assert sorted(os.listdir(tmp_path)) == files


if __name__ == "__main__":
    worker()


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_no_rank_holds_the_whole_model_while_a_sharded_run_starts(layout):
    """A fresh sharded run as train.py starts it (GPT on `meta`, parallel.parallelize, GPT.materialize), on rank 0
    of 2 fake ranks with real tensors: the CPU memory it ever holds, by torch's MemTracker, stays near half the
    model (its shard, plus one block and one parameter drawn whole at a time); GPT(config), the control, holds it
    all."""
    from torch.distributed._tools.mem_tracker import MemTracker
    import parallel
    config = GPTConfig(**dict(DENSE, n_layer=8, n_embd=128))

    def cpu_peak(build):
        tracker = MemTracker()
        with tracker:
            build()
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    def sharded():
        with torch.device("meta"):
            model = GPT(config)
        mesh, _, _ = parallel.mesh_and_ranks(layout, 2, 2, "cpu")
        parallel.parallelize(model, layout, mesh, "cpu")
        model.materialize("cpu")

    dryrun.fake_world(2)
    try:
        whole = sum(p.numel() * 4 for p in GPT(config).parameters())
        assert cpu_peak(lambda: GPT(config)) >= whole
        assert cpu_peak(sharded) < 0.7 * whole
    finally:
        dist.destroy_process_group()


def test_a_dre_model_dry_runs_and_its_core_is_gathered_once_a_step():
    """A DRE config (its core steps are drawn on the host, which fake tensors cannot read) dry-runs at its most
    core steps; under fsdp the all-gathers per step do not grow with them (the core goes with the root's unit)."""
    gathers = []
    for steps in (2, 4):
        model = dict(SMALL, n_layer=3, dre=True, n_prelude=1, n_coda=1, max_reasoning_steps=steps,
                     dre_mean_steps=1.5, dre_backprop_steps=steps)
        r = dry("fsdp", 1, 2, model)
        gathers.append(r["collectives"]["all_gather"][0])
    assert gathers[0] == gathers[1] > 0


def test_a_pipeline_of_ddp_stages_dry_runs():
    """pp_size=2 over 4 ranks leaves ddp pairs in each stage (DDP wraps each stage by reading its weights, which
    fake tensors lack): the stage runs bare and its gradients' all-reduce is counted, every byte of them."""
    model = dict(DENSE, n_layer=4)
    r = dry("ddp", 1, 4, model, pp_size=2)
    with torch.device("meta"):
        stage = sum(p.numel() for p in GPT(GPTConfig(**model)).transformer.h[:2].parameters())
    assert r["collectives"]["all_reduce"][1] >= 4 * stage


def test_a_checkpointed_moe_block_keeps_only_its_input():
    """Under grad_checkpoint each block keeps its input alone between forward and backward: the fp32 residual
    stream, batch x block_size x n_embd x 4 bytes. Two more MoE blocks add that twice to the peak's activations
    (the loss's backward, at this vocabulary); a rerun in backward that left its activations alive (each MoE
    layer once kept its rerun's aux loss, and with it the rerun's graph) would add them for every block done."""
    acts = []
    for n_layer in (1, 3):
        model = dict(MOE, n_layer=n_layer)
        dryrun.fake_world(1)
        try:
            acts.append(dryrun.measure(model_args(model), settings("ddp", 1, 1, model, micro_steps=1), 1)["peak"][
                "activations"])
        finally:
            dist.destroy_process_group()
    residual = SETTINGS["batch_size"] * SETTINGS["block_size"] * MOE["n_embd"] * 4
    assert acts[1] - acts[0] == pytest.approx(2 * residual, rel=0.01)


def test_a_pipeline_is_dry_run_on_its_first_and_its_last_stage():
    """The last stage holds the head and the loss (here an untied 4096-word head): the dry run measures rank 0 and
    the last rank and reports the larger."""
    model = dict(DENSE, n_layer=4, vocab_size=4096, tie_embeddings=False)
    try:
        r = dryrun.worst_rank(model_args(model), settings("fsdp", 1, 4, model, pp_size=2), 4)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    first, last = r["stages"]
    assert (first["rank"], last["rank"]) == (0, 3)
    assert last["total"] > first["total"] and r["total"] == last["total"] and r["rank"] == 3
