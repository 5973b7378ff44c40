"""Every parallel layout against one process on the same global batch, on the CPU with gloo: the same losses step by
step, the same parameters at the end, and a sharded checkpoint that resumes on a different world size."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_train

TINY = ["--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=4",
        "--n_kv_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--gradient_accumulation_steps=2",
        "--eval_iters=1", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=100", "--learning_rate=3e-3",
        "--eval_interval=10", "--max_iters=10"]
MOE = ["--n_expert=4", "--top_k=2", "--expert_hidden=32", "--n_shared_expert=1", "--moe_balance=bias"]
# a recurrent core (reasoning.py) run 1-4 times, drawn per optimizer step: every rank must draw the same r
DRE = ["--dre", "--n_layer=3", "--max_reasoning_steps=4", "--dre_mean_steps=2.5", "--dre_backprop_steps=2"]
# 4 data-parallel ranks need 4 micro-batches to take one each, as one process does (the aux loss is per batch)
MODELS = {"dense": [], "moe": MOE, "dre": DRE, "moe4": [*MOE, "--gradient_accumulation_steps=4"]}
# a pipeline cuts each micro-batch into pp_microbatches pieces, here of one sequence: for MoE (whose balancing
# losses and loads are per piece) that is one process accumulating 4 micro-batches of 1; 4 blocks for 2 x 2 stages
MODELS.update({"moe_pieces": [*MOE, "--batch_size=1", "--gradient_accumulation_steps=4"], "dense4": ["--n_layer=4"]})
PP = ["--pp_size=2", "--pp_microbatches=2"]


def torchrun(nproc, args, cwd, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def weights(out_dir):
    if not os.path.exists(os.path.join(out_dir, "ckpt.pt")):  # a sharded run: export its distributed checkpoint
        subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), str(out_dir), "--ckpt"], check=True,
                       capture_output=True)
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def assert_same_run(out_dir, ref_dir):
    got, want = losses(out_dir), losses(ref_dir)
    assert sorted(got) == list(range(1, 11))
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=1e-5), (it, got[it], want[it])
    got, want = weights(out_dir), weights(ref_dir)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory):
    """One process, 10 steps, for each model; then the dense and the MoE one for two steps more."""
    out = tmp_path_factory.mktemp("single")
    for name, args in MODELS.items():
        run_train([*TINY, *args, f"--out_dir={out / name}"], char_data)
    for name in ("dense", "moe"):
        run_train([*TINY, *MODELS[name], f"--out_dir={out / (name + '_more')}", "--max_iters=12"], char_data)
    return out


@pytest.mark.parametrize("layout,nproc,model,extra", [
    ("ddp", 2, "dense", []), ("fsdp", 2, "dense", []), ("tp", 2, "dense", []), ("ddp", 2, "moe", []),
    ("fsdp", 2, "moe", []), ("tp", 2, "moe", []), ("fsdp+tp", 4, "dense", []), ("ddp", 2, "dre", []),
    ("fsdp", 2, "dre", []),
    ("ddp", 2, "dense", ["--gradient_accumulation_steps=1", "--batch_size=4"]),
    # pipeline: two stages by each schedule; with fsdp or tp over the two ranks of each stage; MoE blocks
    *(pytest.param(layout, nproc, model, extra, id=f"pp-{name}") for name, layout, nproc, model, extra in (
        ("1F1B", "none", 2, "dense", [*PP, "--pp_schedule=1F1B"]),
        ("GPipe", "none", 2, "dense", [*PP, "--pp_schedule=GPipe"]),
        ("Interleaved1F1B", "none", 2, "dense4", [*PP, "--pp_schedule=Interleaved1F1B", "--pp_virtual_stages=2"]),
        ("fsdp", "fsdp", 4, "dense", PP), ("tp", "tp", 4, "dense", PP),
        ("moe", "none", 2, "moe_pieces", [*PP, "--batch_size=2", "--gradient_accumulation_steps=2"]))),
    # expert parallelism: 2 experts a rank, or 1; on 4 ranks with ep_size=2, two copies of each expert
    *(pytest.param(layout, nproc, model, [f"--ep_size={ep}"], id=f"{layout}-{nproc}-{model}-ep{ep}")
      for layout, nproc, model, ep in (("ddp", 2, "moe", 2), ("fsdp", 2, "moe", 2), ("ddp", 4, "moe4", 4),
                                       ("fsdp", 4, "moe4", 2))),
])
def test_layout_matches_single_process(char_data, reference, tmp_path, layout, nproc, model, extra):
    # ddp and fsdp: each rank one of the two micro-batches of 2 sequences; tp: both ranks the same ones; fsdp+tp:
    # both at once. The last case is one micro-batch of 4 sequences, which the two ranks share (2 each)
    out = tmp_path / "run"
    torchrun(nproc, [*TINY, *MODELS[model], f"--out_dir={out}", f"--parallel={layout}", "--tp_size=2", *extra],
             char_data)
    assert_same_run(out, reference / model)


@pytest.mark.parametrize("model,layout", [("dense", ["--parallel=fsdp"]), ("moe", ["--parallel=ddp", "--ep_size=2"]),
                                          pytest.param("dense", PP, id="pp-dense")])
def test_sharded_checkpoint_resumes_on_one_process(char_data, reference, tmp_path, model, layout):
    torchrun(2, [*TINY, *MODELS[model], f"--out_dir={tmp_path}", *layout], char_data)
    assert os.path.exists(tmp_path / "ckpt_dcp" / "meta.pt") and not os.path.exists(tmp_path / "ckpt.pt")
    run_train([*TINY, *MODELS[model], f"--out_dir={tmp_path}", "--max_iters=12", "--init_from=resume"], char_data)
    got, want = losses(tmp_path), losses(reference / f"{model}_more")
    for it in (11, 12):  # optimizer state, data position and RNG all came back, resharded from 2 ranks to 1
        assert got[it] == pytest.approx(want[it], rel=1e-5), (it, got[it], want[it])


def test_pipeline_checkpoint_resumes_as_a_pipeline(char_data, reference, tmp_path):
    # each stage saves only its own blocks and param groups; resumed as the same pipeline, every stage gets its own back
    torchrun(2, [*TINY, f"--out_dir={tmp_path}", *PP], char_data)
    torchrun(2, [*TINY, f"--out_dir={tmp_path}", *PP, "--max_iters=12", "--init_from=resume"], char_data)
    got, want = losses(tmp_path), losses(reference / "dense_more")
    for it in (11, 12):
        assert got[it] == pytest.approx(want[it], rel=1e-5), (it, got[it], want[it])


@pytest.mark.parametrize("args,message", [
    (["--parallel=tp", "--tp_size=3"], "not divisible by tp_size=3"),
    (["--parallel=tp", "--tp_size=2", "--n_head=3", "--n_kv_head=3", "--n_embd=48"], "n_head=3"),
    (["--parallel=ddp", "--gradient_accumulation_steps=3", "--batch_size=3"], "batch is too small"),
    (["--parallel=none"], "unrelated models"),
    (["--parallel=tp", "--tp_size=2", *DRE], "dre is not supported with tensor parallelism"),
    ([*MOE, "--parallel=ddp", "--ep_size=3"], "n_expert=4 across ep_size=3"),
    (["--pp_size=2", "--pp_microbatches=3"], "pp_microbatches=3 does not divide the 2 sequences"),
])
def test_impossible_layout_fails_before_any_work(char_data, tmp_path, args, message):
    proc = torchrun(2, [*TINY, f"--out_dir={tmp_path}", *args], char_data, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, proc.stdout[-2000:]
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # it stopped before training


@pytest.mark.parametrize("settings,message", [
    (dict(n_layer=3), "n_layer=3 into pp_size x pp_virtual_stages = 2 stages"),
    (dict(pp_schedule="ZeroBubble"), "pp_schedule must be one of 1F1B, GPipe, Interleaved1F1B"),
    (dict(pp_schedule="Interleaved1F1B", pp_virtual_stages=2, n_layer=6), "n_layer=6 into pp_size x"),
    (dict(pp_virtual_stages=2), "Interleaved1F1B runs 2 or more virtual stages"),
    (dict(pp_microbatches=1), "1F1B needs at least as many micro-batches as stages"),
    (dict(dre=True, n_layer=4), "dre is not supported with pipeline parallelism"),
])
def test_impossible_pipeline_is_refused(settings, message):
    from model import GPTConfig
    from parallel import check_layout
    pp = {k: settings.pop(k) for k in list(settings) if k.startswith("pp_")}
    config = GPTConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 32, **settings})
    with pytest.raises(ValueError, match=message):
        check_layout("none", 1, 2, config, 2, 32, 2, **{"pp_size": 2, "pp_microbatches": 2, **pp})


def test_half_set_torchrun_environment_is_a_clear_error(char_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = run_train([*TINY, f"--out_dir={tmp_path}"], char_data, check=False,
                     env=dict(env, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2"))
    assert proc.returncode != 0 and "half set" in proc.stdout + proc.stderr


@pytest.mark.parametrize("layout,ep_size,model,message", [
    ("ddp", 2, {}, "this one is dense"),
    ("ddp", 3, {"n_expert": 6}, "world size 4 is not divisible by ep_size=3"),
    ("ddp", 8, {"n_expert": 4}, "n_expert=4 across ep_size=8"),
    ("fsdp+tp", 2, {"n_expert": 4}, "not supported yet"),
    ("tp", 2, {"n_expert": 4}, "not supported yet"),
    ("ddp", 2, {"n_expert": 4, "dre": True, "n_layer": 3}, "dre is not supported with expert parallelism"),
    ("fsdp", 0, {"n_expert": 4}, "ep_size must be at least 1"),
])
def test_impossible_expert_parallel_layout_is_refused(layout, ep_size, model, message):
    from model import GPTConfig
    from parallel import check_layout
    config = GPTConfig(n_layer=model.pop("n_layer", 2), n_head=4, n_embd=32, **model)
    with pytest.raises(ValueError, match=message):
        check_layout(layout, 2, 4, config, 2, 32, 4, ep_size=ep_size)


def expert_parallel_layer_check(ep_size, capacity_factor, unused):
    """Run by test_expert_parallel_layer_matches_one_process on every rank (python test_parallel.py ...): one MoE
    layer in float64 on this rank's slice of a batch, once whole and once with its experts split by ep_size, from the
    same weights. Experts in `unused` are never routed to (with ep_size=2 and unused=2,3 rank 1 receives no rows)."""
    import copy
    import torch.distributed as dist
    import parallel
    from model import GPTConfig
    from moe import MoE, local
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = MoE(GPTConfig(n_layer=1, n_head=1, n_embd=8, n_expert=4, top_k=2, expert_hidden=16, moe_balance="bias",
                        capacity_factor=capacity_factor)).double()
    ref.expert_bias[unused] = -10.0  # never chosen: scores are in (0, 1)
    layer = copy.deepcopy(ref)
    parallel.apply_expert_parallel(layer, ep_size, "cpu")
    x, g = torch.randn(2, world, 16, 8, dtype=torch.float64)[:, rank:rank + 1]  # this rank's 16 tokens

    def run(moe):  # as under data parallelism: the mean over this rank's tokens
        xr = x.clone().requires_grad_()
        y = moe(xr)
        ((y * g).sum() / 16).backward()
        return y, xr.grad

    (y_ref, gx_ref), (y, gx) = run(ref), run(layer)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    for p in [*ref.parameters(), layer.router.weight]:  # what DDP or FSDP would do: the mean over the ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    parallel.sync_expert_grads(layer)
    torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad)
    n, ep_rank = 4 // ep_size, rank % ep_size
    for name in ("w1", "w3", "w2"):
        got, want = local(getattr(layer, name).grad), getattr(ref, name).grad[ep_rank * n:(ep_rank + 1) * n]
        used = [e not in unused for e in range(ep_rank * n, (ep_rank + 1) * n)]
        assert got.shape[0] == n and want.flatten(1).abs().sum(1).gt(0).tolist() == used
        torch.testing.assert_close(got, want, msg=name)
    dist.destroy_process_group()


@pytest.mark.parametrize("nproc,ep_size,capacity_factor,unused", [
    (2, 2, 0.0, [2, 3]),  # rank 1's experts get no rows
    (4, 2, 1.0, [3]),     # two copies of each expert, an empty expert, capacity dropping some pairs
])
def test_expert_parallel_layer_matches_one_process(tmp_path, nproc, ep_size, capacity_factor, unused):
    # outputs, input gradients, router and expert gradients: the all_to_all's uneven splits, including empty ones
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           str(ep_size), str(capacity_factor), ",".join(map(str, unused))]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_compile_blocks_traces_one_graph_for_all_blocks_and_changes_nothing():
    """Three alike blocks, one graph (dynamo's capture, run as captured: inductor's code generation is torch's to
    test); the same loss, gradients and parameter names as the eager model."""
    import copy
    import parallel
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    eager = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = parallel.compile_blocks(copy.deepcopy(eager), backend=backend)
    idx = torch.randint(20, (2, 9), generator=torch.Generator().manual_seed(1))
    losses = [m(idx[:, :-1], idx[:, 1:])[1] for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert len(graphs) == 1
    torch.testing.assert_close(losses[1], losses[0])
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


CLIP_CASES = [("fsdp", 1, 1, 1), ("tp", 4, 1, 2), ("fsdp+tp", 2, 1, 3), ("ddp", 1, 2, 2)]  # layout, tp, ep, reductions


def clipping_check():
    """Run by test_clipping_matches_one_process on 4 ranks: in each layout (every rank given the same batch, so the
    gradients are one process's), the norm and the clipped gradients of parallel.clip_grad_norm_ against
    torch.nn.utils.clip_grad_norm_ on one process, and one scalar all-reduce per dimension of each mesh."""
    import copy
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode
    import parallel
    from model import GPT, GPTConfig
    dist.init_process_group("gloo")
    for layout, tp_size, ep_size, reductions in CLIP_CASES:
        torch.manual_seed(0)
        moe = dict(n_expert=4, top_k=2, expert_hidden=16) if ep_size > 1 else {}
        ref = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, mlp_hidden=32, **moe))
        mesh, _, _ = parallel.mesh_and_ranks(layout, tp_size, dist.get_world_size(), "cpu")
        model = parallel.parallelize(copy.deepcopy(ref), layout, mesh, "cpu", ep_size=ep_size)
        idx = torch.randint(50, (4, 17), generator=torch.Generator().manual_seed(1))
        for m in (ref, model):
            m(idx[:, :-1], idx[:, 1:])[1].backward()
        parallel.sync_expert_grads(model)
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        with CommDebugMode() as comm:
            got = parallel.clip_grad_norm_(list(model.parameters()), 0.1)
        assert want > 0.2, "the case must clip"
        torch.testing.assert_close(got, want, msg=layout)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(g, q.grad, msg=layout)
        assert comm.get_total_counts() == reductions, (layout, comm.get_comm_counts())
    dist.destroy_process_group()


def test_clipping_matches_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", __file__, "clip"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__" and sys.argv[1] == "clip":
    clipping_check()
elif __name__ == "__main__":
    expert_parallel_layer_check(int(sys.argv[1]), float(sys.argv[2]), [int(e) for e in sys.argv[3].split(",")])
