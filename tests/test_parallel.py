"""Every parallel layout against one process on the same global batch, on the CPU with gloo: the same losses step by
step and the same parameters at the end. The layouts run in-process, one after another, in one torchrun launch per
world size (python tests/test_parallel.py 2|4 is that worker); train.py itself runs under torchrun in a few
end-to-end cases: a sharded checkpoint that resumes on a different world size, a pipeline's own checkpoint."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, run_train

TINY = ["--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=4",
        "--n_kv_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--gradient_accumulation_steps=2",
        "--eval_iters=1", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=100", "--learning_rate=3e-3",
        "--eval_interval=10", "--max_iters=10"]
MOE = ["--n_expert=4", "--top_k=2", "--expert_hidden=32", "--n_shared_expert=1", "--moe_balance=bias"]
PP = ["--pp_size=2", "--pp_microbatches=2"]


def torchrun(nproc, args, cwd, check=True, script=os.path.join(ROOT, "train.py")):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# -----------------------------------------------------------------------------
# the layouts, in-process: the training step as train.py takes it, on each layout and on one process

SIZES = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, vocab_size=65)
MODELS = {"dense": {}, "dense4": dict(n_layer=4),
          "moe": dict(n_expert=4, top_k=2, expert_hidden=32, n_shared_expert=1, moe_balance="bias"),
          # a recurrent core of 2 blocks (reasoning.py) run 1-4 times, drawn per optimizer step (every rank must draw
          # the same r; these steps draw 4, 1, 4, 1), gradients through the last 2
          "dre": dict(dre=True, n_layer=4, max_reasoning_steps=4, dre_mean_steps=2.5, dre_backprop_steps=2)}
MODELS["dre_ckpt"] = dict(MODELS["dre"], grad_checkpoint=True)  # each block's forward run again in backward
STEPS = 4


def case(name, layout, model="dense", accum=2, batch=2, ref_accum=None, tp=2, ep=1, pp=None):
    """A layout and the step it takes: `accum` micro-batches of `batch` sequences, shared out among the
    data-parallel ranks as train.py does; the one-process reference takes the same sequences in ref_accum
    micro-batches (the same ones unless said: MoE's balancing loss is per micro-batch)."""
    return dict(name=name, layout=layout, model=model, accum=accum, batch=batch, ref_accum=ref_accum or accum, tp=tp,
                ep=ep, pp=pp)


def pipe(schedule="1F1B", microbatches=2, virtual=1):
    return dict(size=2, schedule=schedule, microbatches=microbatches, virtual=virtual)


LAYOUTS = {
    2: [case("ddp", "ddp"), case("fsdp", "fsdp"), case("tp", "tp"), case("ddp-moe", "ddp", "moe"),
        case("fsdp-moe", "fsdp", "moe"), case("tp-moe", "tp", "moe"), case("ddp-dre", "ddp", "dre"),
        case("fsdp-dre", "fsdp", "dre"), case("fsdp-dre-ckpt", "fsdp", "dre_ckpt"),
        # one micro-batch of 4 sequences, which the two ranks share (2 each)
        case("ddp-split-batch", "ddp", accum=1, batch=4),
        # pipeline: two stages by each schedule, each micro-batch cut in two pieces; for MoE (whose balancing losses
        # and loads are per piece) that is one process taking 4 micro-batches of 1
        case("pp-1F1B", "none", pp=pipe()), case("pp-GPipe", "none", pp=pipe("GPipe")),
        case("pp-Interleaved1F1B", "none", "dense4", pp=pipe("Interleaved1F1B", virtual=2)),
        case("pp-moe", "none", "moe", ref_accum=4, pp=pipe()),
        # expert parallelism: 2 experts a rank
        case("ddp-moe-ep2", "ddp", "moe", ep=2), case("fsdp-moe-ep2", "fsdp", "moe", ep=2)],
    4: [case("fsdp+tp", "fsdp+tp"), case("pp-fsdp", "fsdp", pp=pipe()), case("pp-tp", "tp", pp=pipe()),
        # 4 data-parallel ranks need 4 micro-batches to take one each; 1 expert a rank, or two copies of 2 each
        case("ddp-moe-ep4", "ddp", "moe", accum=4, ep=4), case("fsdp-moe-ep2", "fsdp", "moe", accum=4, ep=2)],
}


def train_steps(model, raw, data, dp_rank=0, dp=1, loss_ranks=0):
    """train.py's optimizer steps with its settings in TINY (AdamW, lr 3e-3, clipping at 1, routing-bias updates)
    on `data`, each step's sequences (micro-batches, batch, T+1), of which this rank takes its share as train.py's
    get_batch does. Each step's loss over the global batch (summed over loss_ranks ranks; 0: one process) and its
    gradient norm, as clipping found it."""
    import torch.distributed as dist
    from moe import sync_expert_grads
    from parallel import optimizer_kwargs
    optimizers = raw.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu", "adamw", optimizer_kwargs(raw, "cpu"))
    losses = []
    for it, step in enumerate(data):
        # micro-step k draws global micro-batches k*dp..k*dp+dp-1, this rank the r-th; when there are fewer
        # micro-batches than ranks, each is shared
        b = step.shape[1] // dp
        mine = step[dp_rank::dp] if len(step) % dp == 0 else step[:, dp_rank * b:(dp_rank + 1) * b]
        if raw.config.dre:
            raw.depth.iteration = it
        loss_sum = torch.zeros(())
        for k, seqs in enumerate(mine):
            model.no_sync(sync=k == len(mine) - 1)
            _, loss = model(seqs[:, :-1], seqs[:, 1:])
            loss, moe_loss = loss / len(mine), model.moe_loss() / len(mine)
            model.backward(loss + moe_loss)
            loss_sum += loss.detach()
        sync_expert_grads(raw)
        model.finish_backward()
        norm = model.clip_grad_norm_(1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=not model.grads_in_buckets)
        for layer in raw.moe_layers():
            layer.update_bias(1e-3)
        if loss_ranks:
            dist.all_reduce(loss_sum)
            loss_sum /= loss_ranks
        losses += [loss_sum.item(), norm.item()]
    return losses


def layout_case(c, solo):
    """One case of LAYOUTS on this rank: the same model and data on one process and on the layout."""
    import torch.distributed as dist
    import parallel
    from model import GPT, GPTConfig
    torch.manual_seed(1337)
    ref = GPT(GPTConfig(**{**SIZES, **MODELS[c["model"]]}))
    on_meta = c["layout"] != "ddp"  # as train.py starts a fresh run: on `meta`, each rank drawing its parts
    if on_meta:
        torch.manual_seed(1337)
        with torch.device("meta"):
            model = GPT(GPTConfig(**{**SIZES, **MODELS[c["model"]]}))
    else:
        model = copy.deepcopy(ref)
    for layer in ref.moe_layers():
        layer.load_group = solo  # the reference is one process: its routing loads are its own
    data = torch.randint(65, (STEPS, c["accum"], c["batch"], 33), generator=torch.Generator().manual_seed(0))
    want = train_steps(parallel.Layout(ref, ref, "none"), ref, data.view(STEPS, c["ref_accum"], -1, 33))

    world, pp = dist.get_world_size(), c["pp"]
    mesh, dp_rank, dp = parallel.mesh_and_ranks(c["layout"], c["tp"], world, "cpu", pp["size"] if pp else 1)
    accum, batch = (c["accum"] // dp, c["batch"]) if c["accum"] % dp == 0 else (c["accum"], c["batch"] // dp)
    pipeline = dict(schedule=pp["schedule"], microbatches=pp["microbatches"], virtual=pp["virtual"],
                    accumulation=accum, batch=batch, seq_len=32) if pp else None
    wrapped = parallel.parallelize(model, c["layout"], mesh, "cpu", ep_size=c["ep"], pipeline=pipeline)
    if on_meta:
        model.materialize("cpu", [wrapped] if pp else [])
    got = train_steps(wrapped, model, data, dp_rank, dp, loss_ranks=world // (pp["size"] if pp else 1))
    assert got == pytest.approx(want, rel=1e-5), (c["name"], got, want)  # losses and gradient norms, step by step
    # every parameter this rank holds (a pipeline stage: its own), whole, against the one process's
    full = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in model.named_parameters()}
    expected = ref.state_dict()  # (a tied head and embedding under both names: a stage may hold either)
    for name, p in full.items():
        torch.testing.assert_close(p, expected[name], rtol=1e-4, atol=1e-5, msg=f"{c['name']}: {name}")
    assert full, c["name"]


def layout_check(world):
    """The worker of test_every_layout_matches_one_process, on every rank: each case of LAYOUTS[world], then the
    expert-parallel layer (2 ranks; 4 with two copies of each expert) and clipping (4 ranks)."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    solo, _ = dist.new_subgroups(1)
    for c in LAYOUTS[world]:
        layout_case(c, solo)
        if dist.get_rank() == 0:
            print("ok", c["name"], flush=True)
    if world == 2:
        expert_parallel_layer_check(2, 0.0, [2, 3])  # rank 1's experts get no rows
        dre_gather_check()
    else:
        expert_parallel_layer_check(2, 1.0, [3])  # an empty expert, capacity dropping some pairs
        clipping_check()
    if dist.get_rank() == 0:
        print("ok experts and clipping", flush=True)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_matches_one_process(tmp_path, world):
    proc = torchrun(world, [str(world)], tmp_path, script=__file__)
    done = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert done == [c["name"] for c in LAYOUTS[world]] + ["experts"], proc.stdout[-3000:]


# -----------------------------------------------------------------------------
# train.py under torchrun, end to end

def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory):
    """One process, 12 steps of a tiny model ('dense' or 'moe'), run once when first asked for."""
    out, done = tmp_path_factory.mktemp("single"), {}

    def run(model):
        if model not in done:
            run_train([*TINY, *(MOE if model == "moe" else []), f"--out_dir={out / model}", "--max_iters=12"],
                      char_data)
            done[model] = losses(out / model)
        return done[model]
    return run


def assert_losses(got, want, iters):
    assert sorted(got) == list(iters), sorted(got)
    for it in iters:
        assert got[it] == pytest.approx(want[it], rel=1e-5), (it, got[it], want[it])


@pytest.mark.parametrize("model,layout", [
    ("dense", ["--parallel=fsdp"]),
    pytest.param("moe", ["--parallel=ddp", "--ep_size=2"], marks=pytest.mark.slow),
    pytest.param("dense", PP, id="pp-dense", marks=pytest.mark.slow)])
def test_sharded_run_matches_one_process_and_resumes_on_one(char_data, reference, tmp_path, model, layout):
    # train.py's own step, data slicing, evaluation and distributed checkpoint under a layout
    torchrun(2, [*TINY, *(MOE if model == "moe" else []), f"--out_dir={tmp_path}", *layout], char_data)
    assert_losses(losses(tmp_path), reference(model), range(1, 11))
    assert os.path.exists(tmp_path / "ckpt_dcp" / "meta.pt") and not os.path.exists(tmp_path / "ckpt.pt")
    run_train([*TINY, *(MOE if model == "moe" else []), f"--out_dir={tmp_path}", "--max_iters=12",
               "--init_from=resume"], char_data)
    # optimizer state, data position and RNG all came back, resharded from 2 ranks to 1
    assert_losses({k: v for k, v in losses(tmp_path).items() if k > 10}, reference(model), (11, 12))


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_as_a_pipeline(char_data, reference, tmp_path):
    # each stage saves only its own blocks and param groups; resumed as the same pipeline, every stage gets its own back
    torchrun(2, [*TINY, f"--out_dir={tmp_path}", *PP], char_data)
    torchrun(2, [*TINY, f"--out_dir={tmp_path}", *PP, "--max_iters=12", "--init_from=resume"], char_data)
    assert_losses({k: v for k, v in losses(tmp_path).items() if k > 10}, reference("dense"), (11, 12))


def test_impossible_layout_fails_in_one_line_before_any_work(char_data, tmp_path):
    proc = torchrun(2, [*TINY, f"--out_dir={tmp_path}", "--parallel=tp", "--tp_size=3"], char_data, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count("error:") == 1, out[-2000:]  # rank 0 says it, once
    assert "not divisible by tp_size=3" in out
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # it stopped before training


@pytest.fixture
def two_ranks():
    """A process group of 2 that moves nothing (torch's fake backend), for the checks that need one."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("layout,tp_size,model,batch,pp,message", [
    ("tp", 3, {}, (2, 2), {}, "not divisible by tp_size=3"),
    ("tp", 2, dict(n_head=3, n_kv_head=3, n_embd=48), (2, 2), {}, "n_head=3"),
    ("ddp", 1, {}, (3, 3), {}, "batch is too small"),
    ("none", 1, {}, (2, 2), {}, "unrelated models"),
    ("tp", 2, MODELS["dre"], (2, 2), {}, "dre is not supported with tensor parallelism"),
    ("none", 1, {}, (2, 2), dict(pp_size=2, pp_microbatches=3), "pp_microbatches=3 does not divide the 2 sequences"),
])
def test_impossible_layout_is_refused(two_ranks, layout, tp_size, model, batch, pp, message):
    from model import GPTConfig
    from parallel import check_layout
    config = GPTConfig(**{**SIZES, **model})
    with pytest.raises(ValueError, match=message):
        check_layout(layout, tp_size, 2, config, batch[0], 32, batch[1], **pp)


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
    ("ddp", 3, {"n_expert": 4}, "n_expert=4 across ep_size=3"),
])
def test_impossible_expert_parallel_layout_is_refused(layout, ep_size, model, message):
    from model import GPTConfig
    from parallel import check_layout
    config = GPTConfig(n_layer=model.pop("n_layer", 2), n_head=4, n_embd=32, **model)
    with pytest.raises(ValueError, match=message):
        check_layout(layout, 2, 4, config, 2, 32, 4, ep_size=ep_size)


def expert_parallel_layer_check(ep_size, capacity_factor, unused):
    """Run by the layout worker on every rank: one MoE
    layer in float64 on this rank's slice of a batch, once whole and once with its experts split by ep_size, from the
    same weights. Experts in `unused` are never routed to (with ep_size=2 and unused=2,3 rank 1 receives no rows)."""
    import copy
    import torch.distributed as dist
    import moe
    from model import GPTConfig
    from moe import MoE, local
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = MoE(GPTConfig(n_layer=1, n_head=1, n_embd=8, n_expert=4, top_k=2, expert_hidden=16, moe_balance="bias",
                        capacity_factor=capacity_factor)).double()
    ref.expert_bias[unused] = -10.0  # never chosen: scores are in (0, 1)
    layer = copy.deepcopy(ref)
    moe.apply_expert_parallel(layer, ep_size, "cpu")
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
    moe.sync_expert_grads(layer)
    torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad)
    n, ep_rank = 4 // ep_size, rank % ep_size
    for name in ("w13", "w2"):
        got, want = local(getattr(layer, name).grad), getattr(ref, name).grad[ep_rank * n:(ep_rank + 1) * n]
        used = [e not in unused for e in range(ep_rank * n, (ep_rank + 1) * n)]
        assert got.shape[0] == n and want.flatten(1).abs().sum(1).gt(0).tolist() == used
        torch.testing.assert_close(got, want, msg=name)



class CollectiveCounter(TorchDispatchMode):
    """Counts the process-group collectives a rank runs (FSDP's all-gathers and reduce-scatters), by op name."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            name = func.overloadpacket.__name__.strip("_")
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def dre_gather_check():
    """Run by the layout worker on 2 ranks: the collectives of one fsdp training step of a DRE (prelude, a core of 2
    blocks, coda), with and without grad_checkpoint, and of an evaluation forward, do not grow with the core steps r.
    By hand: 3 units (the prelude, the coda, the root with the core), each gathered once in forward and once in
    backward (reshard_after_forward) and reduce-scattered once; a forward without gradients gathers each once."""
    import torch.distributed as dist
    import parallel
    from model import GPT, GPTConfig
    idx = torch.randint(65, (2, 17), generator=torch.Generator().manual_seed(0))
    for grad_checkpoint in (False, True):
        for r in (2, 4):  # 4: the first 2 steps without gradients (backprop through the last 2)
            torch.manual_seed(0)
            config = GPTConfig(**{**SIZES, **MODELS["dre"], "max_reasoning_steps": r, "dre_sample_steps": False,
                                  "grad_checkpoint": grad_checkpoint})
            model = GPT(config)
            mesh, _, _ = parallel.mesh_and_ranks("fsdp", 1, dist.get_world_size(), "cpu")
            wrapped = parallel.parallelize(model, "fsdp", mesh, "cpu")
            with CollectiveCounter() as step:
                wrapped(idx[:, :-1], idx[:, 1:])[1].backward()
            model.eval()
            with CollectiveCounter() as evaluation, torch.no_grad():
                wrapped(idx[:, :-1], steps=r)
            assert model.depth.last_r == r
            assert step.counts == {"allgather_base": 6, "reduce_scatter_base": 3}, (r, grad_checkpoint, step.counts)
            assert evaluation.counts == {"allgather_base": 3}, (r, evaluation.counts)


CLIP_CASES = [("fsdp", 1, 1, 1), ("tp", 4, 1, 2), ("fsdp+tp", 2, 1, 2), ("ddp", 1, 2, 2)]  # layout, tp, ep, reductions


def clipping_check():
    """Run by the layout worker on 4 ranks: in each layout (every rank given the same batch, so the
    gradients are one process's), the norm and the clipped gradients of parallel.clip_grad_norm_ against
    torch.nn.utils.clip_grad_norm_ on one process, and one scalar all-reduce per dimension of each mesh."""
    import copy
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode
    import parallel
    from model import GPT, GPTConfig
    from moe import sync_expert_grads
    for layout, tp_size, ep_size, reductions in CLIP_CASES:
        torch.manual_seed(0)
        experts = dict(n_expert=4, top_k=2, expert_hidden=16) if ep_size > 1 else {}
        ref = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, mlp_hidden=32, **experts))
        mesh, _, _ = parallel.mesh_and_ranks(layout, tp_size, dist.get_world_size(), "cpu")
        model = parallel.parallelize(copy.deepcopy(ref), layout, mesh, "cpu", ep_size=ep_size)
        idx = torch.randint(50, (4, 17), generator=torch.Generator().manual_seed(1))
        for m in (ref, model):
            m(idx[:, :-1], idx[:, 1:])[1].backward()
        sync_expert_grads(model)
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        with CommDebugMode() as comm:
            got = parallel.clip_grad_norm_(list(model.parameters()), 0.1)
        assert want > 0.2, "the case must clip"
        torch.testing.assert_close(got, want, msg=layout)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(g, q.grad, msg=layout)
        assert comm.get_total_counts() == reductions, (layout, comm.get_comm_counts())



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


if __name__ == "__main__":
    layout_check(int(sys.argv[1]))
