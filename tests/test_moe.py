"""moe.py against a naive per-expert loop written here, the balancing losses against their formulas worked by hand,
capacity dropping, bias balancing, and the MoE model through train.py."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_train
from model import GPT, MLP, GPTConfig
from moe import MoE


def make_moe(E=4, k=2, d=16, h=24, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=d, n_expert=E, top_k=k, expert_hidden=h, **kw)
    moe = MoE(cfg)
    if cfg.n_shared_expert:  # as model.Block builds it
        moe.shared = MLP(cfg, cfg.n_shared_expert * h)
    return moe


def naive_moe(moe, x, keep=None):
    """The textbook layer in float64: route each token, then loop over experts with index_select / index_add. At
    top_k=1 the weight is the softmax probability itself (Switch). keep (N, k) bool: the pairs capacity kept."""
    router, w13, w2 = (p.double() for p in (moe.router.weight, moe.w13, moe.w2))
    w1, w3 = w13[:, 0], w13[:, 1]  # gate, up
    x = x.double()
    probs = (x @ router.t()).softmax(-1)
    weight, expert = probs.topk(moe.top_k, dim=-1)
    if moe.top_k > 1:
        weight = weight / weight.sum(-1, keepdim=True)
    if keep is not None:
        weight = weight * keep
    out = torch.zeros_like(x)
    for e in range(moe.n_expert):
        token, slot = (expert == e).nonzero(as_tuple=True)
        xe = x.index_select(0, token)
        ye = (F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())) @ w2[e].t()
        out = out.index_add(0, token, ye * weight[token, slot, None])
    return out


def grads(moe, x, out):
    moe.zero_grad()
    x.grad = None
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()  # non-uniform
    return [x.grad.clone()] + [p.grad.clone() for p in (moe.router.weight, moe.w13, moe.w2)]


def assert_close_scaled(got, want, tol, msg=""):
    """got within tol of want, relative to want's largest entry (bf16 rounds each entry to ~3 digits)."""
    scale = max(want.abs().max().item(), 1e-30)
    assert (got.double() - want).abs().max().item() <= tol * scale, (msg, (got.double() - want).abs().max(), scale)


# (8, 2, 1): a single token leaves six experts empty; (8, 1, 3): top-1, where the weight is the raw probability
SHAPES = [(4, 2, 40), (8, 2, 1), (8, 1, 3), (4, 4, 7)]
# each path in the dtype it runs in on the CPU (bf16 via autocast, as train.py runs it), against float64
PATHS = [("loop", torch.float32, 1e-5), ("grouped_mm", torch.bfloat16, 3e-2)]


@pytest.mark.parametrize("kernel,dtype,tol", PATHS)
@pytest.mark.parametrize("E,k,tokens", SHAPES)
def test_moe_matches_float64_naive_loop(E, k, tokens, kernel, dtype, tol):
    moe = make_moe(E=E, k=k, moe_kernel=kernel)
    x = torch.randn(tokens, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = moe(x.view(1, tokens, 16)).view(tokens, 16)
    assert out.dtype == dtype
    ref = naive_moe(moe, x)
    assert_close_scaled(out, ref, tol, "out")
    for name, g, r in zip(("x", "router", "w13", "w2"), grads(moe, x, out.float()), grads(moe, x, ref)):
        assert_close_scaled(g, r, tol, name)
    if tokens == 1:  # experts that got no token get exactly zero gradient
        used = set(moe.route(x.detach())[0].flatten().tolist())
        for e in set(range(E)) - used:
            assert moe.w13.grad[e].abs().sum() == 0 and moe.w2.grad[e].abs().sum() == 0


def test_top1_router_learns_from_the_language_model_loss():
    # with the weight renormalised to p/p = 1 the router got 1e-12 (rounding) from this loss; with p it gets 1.5e-5
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, n_expert=4, top_k=1,
                          expert_hidden=16, aux_loss_coef=0.0, z_loss_coef=0.0))
    x = torch.randint(0, 32, (4, 8))
    _, loss = model(x, x)
    loss.backward()
    router = model.moe_layers()[0].router.weight.grad
    assert router.abs().max() > 1e-7, router.abs().max()


def test_shared_expert_adds_a_dense_mlp():
    moe = make_moe(n_shared_expert=1)
    x = torch.randn(1, 10, 16)
    routed = naive_moe(moe, x[0]).float()
    torch.testing.assert_close(moe(x)[0], routed + moe.shared(x)[0], rtol=1e-5, atol=1e-6)


def kept_by_score(moe, x, capacity):
    """Independently of moe.py: for each expert, the `capacity` (token, slot) pairs routed to it with the highest
    router probability, as a (N, k) mask."""
    probs = (x.double() @ moe.router.weight.double().t()).softmax(-1)
    expert = probs.topk(moe.top_k, dim=-1).indices
    keep = torch.zeros(expert.shape, dtype=torch.bool)
    for e in range(moe.n_expert):
        pairs = [(i, j) for i in range(len(x)) for j in range(moe.top_k) if expert[i, j] == e]
        for i, j in sorted(pairs, key=lambda p: -probs[p[0], e].item())[:capacity]:
            keep[i, j] = True
    return keep


@pytest.mark.parametrize("kernel,dtype,tol", PATHS)
@pytest.mark.parametrize("k", [1, 2])
def test_capacity_keeps_per_expert_the_highest_scoring_pairs(k, kernel, dtype, tol):
    moe = make_moe(E=4, k=k, capacity_factor=1.0, moe_kernel=kernel)
    with torch.no_grad():  # expert 0 is everyone's favourite, by unequal margins; the best come late in the batch
        moe.router.weight[0, 0] += 3.0
    x = torch.randn(64, 16)
    x[:, 0] = torch.linspace(0.1, 2.0, 64)
    capacity = math.ceil(64 * k / 4)
    keep = kept_by_score(moe, x, capacity)
    assert (~keep).sum() > 0  # the test needs an overloaded expert
    expert, weight, score, _ = moe.route(x)
    order, counts = moe.sort_by_expert(expert, score)
    bounds = [0, *counts.cumsum(0).tolist()]
    # each expert's group holds its kept tokens (moe.route may order a token's slots unlike topk: compare tokens)
    ref_expert = (x.double() @ moe.router.weight.double().t()).softmax(-1).topk(k).indices
    for e in range(4):
        group = order[bounds[e]:bounds[e + 1]]
        assert (expert.flatten()[group] == e).all()
        want = [i for i in range(64) for j in range(k) if ref_expert[i, j] == e and keep[i, j]]
        assert sorted((group // k).tolist()) == sorted(want), e
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = moe(x.view(1, 64, 16))[0]
    ref = naive_moe(moe, x, keep)
    assert_close_scaled(out, ref, tol, "out")  # a dropped pair adds nothing; the residual carries its token on
    for name, g, r in zip(("x", "router", "w13", "w2"), grads(moe, x, out.float()), grads(moe, x, ref)):
        assert_close_scaled(g, r, tol, name)
    assert moe.metrics()["dropped"] == pytest.approx((~keep).sum().item() / (64 * k))


def test_evaluation_is_dropless_by_default_and_independent_of_the_batch():
    moe = make_moe(E=4, k=2, capacity_factor=0.5)
    with torch.no_grad():
        moe.router.weight[0, 0] += 3.0
    x = torch.randn(1, 32, 16).abs()
    one_at_a_time = lambda: torch.cat([moe(x[:, i:i + 1])[0] for i in range(32)])
    moe.train()
    assert not torch.allclose(moe(x)[0], one_at_a_time())  # training drops pairs: the batch matters
    moe.eval()
    alone = one_at_a_time()
    torch.testing.assert_close(moe(x)[0], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe(x)[0], naive_moe(moe, x[0]).float(), rtol=1e-5, atol=1e-6)
    moe.eval_capacity_factor = 0.5  # asked for, evaluation drops too
    assert not torch.allclose(moe(x)[0], alone)


def test_aux_and_z_loss_match_the_formulas_worked_by_hand():
    # two experts, top-1, router = identity: logits are the inputs. Tokens: [ln3, 0], [ln3, 0], [0, ln3]
    # softmax rows: [3/4, 1/4], [3/4, 1/4], [1/4, 3/4]; choices: 0, 0, 1
    # f = [2/3, 1/3], P = [7/12, 5/12]: aux = alpha * E * sum f P = alpha * 2 * (14/36 + 5/36) = alpha * 19/18
    # every row's logsumexp is ln(3 + 1) = ln 4: z = beta * (ln 4)^2
    alpha, beta = 0.1, 0.01
    moe = make_moe(E=2, k=1, d=2, h=4, aux_loss_coef=alpha, z_loss_coef=beta, router_renormalize=False)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    ln3 = math.log(3)
    x = torch.tensor([[ln3, 0.0], [ln3, 0.0], [0.0, ln3]])
    expert, weight, _, loss = moe.route(x)
    assert expert.flatten().tolist() == [0, 0, 1]
    assert weight.flatten().tolist() == pytest.approx([0.75, 0.75, 0.75])
    assert loss.item() == pytest.approx(alpha * 19 / 18 + beta * math.log(4) ** 2, rel=1e-6)
    moe.eval()  # evaluation adds no balancing loss
    assert moe.route(x)[3].item() == 0
    # top-2: f is each expert's share of the token-expert pairs. Three experts, tokens [ln4, ln2, 0], [0, ln2, ln4]
    # softmax rows [4, 2, 1]/7, [1, 2, 4]/7; choices {0, 1}, {1, 2}: f = [1, 2, 1]/4, P = [5, 4, 5]/14, sum f P = 9/28
    moe = make_moe(E=3, k=2, d=4, h=4, aux_loss_coef=alpha, z_loss_coef=beta)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3, 4))  # the logits are the inputs' first three entries
    loss = moe.route(torch.tensor([[math.log(4), math.log(2), 0, 0], [0, math.log(2), math.log(4), 0]]))[3]
    assert loss.item() == pytest.approx(alpha * 3 * 9 / 28 + beta * math.log(7) ** 2, rel=1e-6)


@pytest.mark.parametrize("score,rate", [("softmax", 1e-3), ("sigmoid", 3e-3)])
def test_bias_balancing_evens_out_a_skewed_router(score, rate):
    moe = make_moe(E=8, k=2, aux_loss_coef=0.0, z_loss_coef=0.0, moe_balance="bias", router_score=score)
    with torch.no_grad():  # a router (frozen here) with a strong taste for experts 0 and 1
        moe.router.weight.normal_(0, 0.3)
        moe.router.weight[:2] += 0.15
    gen = torch.Generator().manual_seed(0)

    def balance():
        moe.metrics()
        with torch.no_grad():
            moe(torch.randn(1, 2048, 16, generator=gen).abs())
        return moe.metrics()["balance"]

    before = balance()
    for _ in range(300):
        with torch.no_grad():
            moe(torch.randn(1, 256, 16, generator=gen).abs())
        moe.update_bias(rate)
    after = balance()
    assert before < 0.4 and after > 0.85, (before, after)
    # the bias chooses experts, but never scales their outputs: the weights are the plain scores
    x = torch.randn(5, 16)
    expert, weight, _, _ = moe.route(x)
    logits = x @ moe.router.weight.t()
    scores = (logits.softmax(-1) if score == "softmax" else logits.sigmoid()).gather(1, expert)
    torch.testing.assert_close(weight, scores / scores.sum(-1, keepdim=True))


def test_metrics_measure_the_load():
    moe = make_moe(E=4, k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0])  # x[:, 0] > 0 -> expert 0; < 0 -> expert 3
    x = torch.zeros(1, 8, 16)
    x[0, :6, 0], x[0, 6:, 0] = 1.0, -1.0
    moe(x)
    m = moe.metrics()
    assert m["tokens_per_expert"] == [6, 0, 0, 2]
    assert m["balance"] == pytest.approx(2 / 6)
    assert m["entropy_bits"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert m["dropped"] == 0
    assert moe.metrics()["tokens_per_expert"] == [0, 0, 0, 0]  # reading resets


def test_every_layers_metrics_and_the_loss_come_in_one_host_read():
    from moe import read_metrics
    from test_sync import HostReads
    layers = [make_moe(E=4, k=1), make_moe(E=4, k=1)]
    with torch.no_grad():
        for layer, gains in zip(layers, ([3.0, 2.0, 1.0, 0.0], [0.0, 3.0, 0.0, 0.0])):
            layer.router.weight.zero_()
            layer.router.weight[:, 0] = torch.tensor(gains)  # the first: 6 tokens to expert 0, 2 to 3; the second: 1
    x = torch.zeros(1, 8, 16)
    x[0, :6, 0], x[0, 6:, 0] = 1.0, -1.0
    for layer in layers:
        layer(x.abs() if layer is layers[1] else x)
    with HostReads() as recorder:
        metrics, values = read_metrics(layers, torch.tensor(1.5), torch.tensor(-2.0))
    assert [r["op"] for r in recorder.reads] == [".tolist()"]
    assert [m["tokens_per_expert"] for m in metrics] == [[6, 0, 0, 2], [0, 8, 0, 0]]
    assert [m["balance"] for m in metrics] == pytest.approx([2 / 6, 2 / 8])
    assert metrics[1]["entropy_bits"] == 0 and values == [1.5, -2.0]


def test_the_triton_path_makes_no_sorted_copy_of_the_rows(monkeypatch):
    """moe_kernel='triton' hands the gather (token -> sorted row) and the scatter (back to token order) to the
    kernel, which fuses them into its loads and stores: the layer's forward copies no rows itself. (The kernel is
    stood in for by the loop path, outside the recording, so that this runs without a GPU.)"""
    import gemm_kernels
    import gemm_kernels.triton_gemm as tg
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    calls = []

    def kernel(x, w, offsets, gather_idx=None, scatter_idx=None, out_rows=None):
        calls.append((x.shape[0], gather_idx is not None, scatter_idx is not None))
        with _disable_current_modes():
            return gemm_kernels._grouped_mm_loop(x, w, offsets, gather_idx, scatter_idx, out_rows)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if args and isinstance(args[0], torch.Tensor) and args[0].shape[-1:] == (16,):  # rows of x or y
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    monkeypatch.setattr(tg, "scatter2scatter", kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    moe, ops = make_moe(E=4, k=2, moe_kernel="triton", capacity_factor=1.0), []
    x = torch.randn(1, 40, 16)
    with Ops():
        out = moe(x)
    assert calls == [(40, True, False), (80, False, True)]  # tokens gathered into 80 sorted rows; scattered back
    assert not {"index_select", "index_copy", "index_copy_", "index", "gather", "scatter"} & set(ops), set(ops)
    keep = kept_by_score(moe, x[0], capacity=20)
    torch.testing.assert_close(out[0].double(), naive_moe(moe, x[0], keep), rtol=1e-5, atol=1e-6)


def test_grad_checkpoint_keeps_the_moe_loss_gradients():
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, n_expert=4, expert_hidden=16)
    x = torch.randint(0, 32, (2, 8))
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**cfg, grad_checkpoint=ckpt))
        _, loss = model(x, x)
        (loss + model.moe_loss()).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], msg=name)


@pytest.mark.parametrize("compiled", [False, True])
def test_grad_checkpoint_counts_routed_tokens_once(compiled):
    # the recompute in backward routes every token again; counting it too doubled tokens_per_expert (64, not 32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, n_expert=4, top_k=2,
                          expert_hidden=16, grad_checkpoint=True, capacity_factor=0.5))
    x = torch.randint(0, 32, (2, 8))
    _, loss = (torch.compile(model) if compiled else model)(x, x)
    loss.backward()
    m = model.moe_layers()[0].metrics()
    assert sum(m["tokens_per_expert"]) == 2 * 8 * 2
    assert 0 < m["dropped"] < 1


def moe_step(layer, x):
    """Forward under bf16 autocast (as train.py runs it) and backward: the output and every gradient."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    ((out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + layer.aux_loss).backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in (layer.router.weight, layer.w13, layer.w2)]


def gpu_path_moe(capacity_factor):
    return make_moe(E=8, k=2, capacity_factor=capacity_factor, moe_kernel="grouped_mm", aux_loss_coef=0.01,
                    z_loss_coef=0.001, moe_balance="bias")


def test_grouped_mm_layer_compiles_fullgraph_and_matches_eager():
    moe = gpu_path_moe(capacity_factor=1.0)
    x = torch.randn(2, 24, 16)
    got = moe_step(torch.compile(moe, fullgraph=True), x)  # fullgraph: any graph break is an error
    moe.zero_grad()
    want = moe_step(moe, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())
    assert sum(moe.metrics()["tokens_per_expert"]) == 2 * (2 * 24 * 2)  # two forwards, one compiled


def syncing_nodes(fn):
    """fn compiled, and a list that running it fills with the nodes of its traced forward and backward graphs that
    read a tensor's value on the host (.item(), .tolist()) or whose shape depends on tensor values (bincount, nonzero,
    boolean-mask indexing): each makes the host wait for a GPU. torch.compile(fullgraph=True) alone accepts them."""
    from torch._dynamo.backends.common import aot_autograd
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    found = []
    # ops whose result needs the host to see tensor values; _assert_scalar checks a value-dependent size at run time
    syncing = ("_local_scalar_dense", "bincount", "nonzero", "masked_select", "unique", "_assert_scalar")

    def record(gm, example_inputs):
        found.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and (
            any(op in str(n.target) for op in syncing) or free_unbacked_symbols(n.meta.get("val"))))
        return gm

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record)), found


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_grouped_mm_layer_has_no_host_sync_forward_or_backward(capacity_factor):
    # the checker finds what the old dispatch did: torch.bincount, and capacity by boolean indexing
    for fn, arg in [(lambda e: torch.bincount(e, minlength=8), torch.randint(0, 8, (10,))),
                    (lambda x: x[x > 0], torch.randn(10))]:
        fn, found = syncing_nodes(fn)
        fn(arg)
        assert found
    layer, found = syncing_nodes(gpu_path_moe(capacity_factor))
    moe_step(layer, torch.randn(2, 24, 16))
    assert len(found) == 0, found


def test_medium_moe_parameter_counts_match_the_formula():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), "config/medium_moe.py"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    L, d, V, E, k, h = 24, 1536, 50304, 8, 2, 2048
    attention, norms, router, expert = 4 * d * d, 2 * d, d * E, 3 * d * h
    total = V * d + L * (attention + norms + router + E * expert) + d  # tied head; the final norm
    active = total - L * (E - k) * expert
    assert f"{total:,} total, {active:,} active" in proc.stdout, proc.stdout
    assert 2.0e9 < total < 2.2e9 and 0.7e9 < active < 0.8e9  # dense medium (760M) per token, ~2.8x the weights


TINY_MOE = ["--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=2",
            "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2", "--log_interval=5",
            "--warmup_iters=2", "--lr_decay_iters=100", "--learning_rate=3e-3", "--n_expert=4", "--top_k=2",
            "--expert_hidden=32"]


@pytest.mark.parametrize("balance", ["aux", "bias"])
def test_moe_model_trains_and_logs_routing(char_data, tmp_path, balance):
    run_train([*TINY_MOE, f"--out_dir={tmp_path}", "--max_iters=10", "--eval_interval=10",
               f"--moe_balance={balance}", "--capacity_factor=1.25"], char_data)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    logged = [r for r in records if "moe" in r]
    assert [r["iter"] for r in logged] == [5, 10]
    for layer in logged[-1]["moe"]:
        # every (token, expert) pair of the 5 steps since the last line, counted before capacity dropping
        assert sum(layer["tokens_per_expert"]) == 5 * 4 * 32 * 2
        assert 0 < layer["balance"] <= 1 and 0 < layer["entropy_bits"] <= 2 and 0 <= layer["dropped"] < 1
    assert logged[-1]["moe_loss"] > 0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    has_bias = any(k.endswith("expert_bias") for k in ckpt["model"])
    assert has_bias == (balance == "bias")
    if balance == "bias":  # the biases moved
        assert any(ckpt["model"][k].abs().sum() > 0 for k in ckpt["model"] if k.endswith("expert_bias"))


# The GPU check (README: one command, a few minutes on one GPU): skipped without CUDA
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_KERNELS = ["triton", "loop"] + (["grouped_mm"] if torch.cuda.is_available()
                                    and torch.cuda.get_device_capability() >= (9, 0) else [])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_gpu_moe_layer_matches_float64_without_host_syncs(kernel, dtype, capacity_factor):
    if kernel == "grouped_mm" and dtype == torch.float16:
        pytest.skip("torch._grouped_mm takes bf16 only")
    moe = make_moe(E=8, k=2, d=64, h=96, capacity_factor=capacity_factor, moe_kernel=kernel).cuda()
    with torch.no_grad():
        moe.router.weight[0, 0] += 3.0  # an overloaded expert, so that capacity drops pairs
    x = torch.randn(512, 64)
    x[:, 0] = x[:, 0].abs()
    dy = torch.linspace(-1, 1, x.numel()).view_as(x)
    xg, dyg = x.cuda().requires_grad_(), dy.cuda()  # copied before the check: a host-to-device copy syncs too

    def run():
        moe.zero_grad()
        xg.grad = None
        with torch.autocast("cuda", dtype=dtype):
            out = moe(xg.view(1, 512, 64)).view(512, 64)
        out.float().backward(dyg)
        return out

    run()  # compiles the Triton kernels
    torch.cuda.synchronize()
    if kernel != "loop":  # the loop reads the group sizes on the host by design
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    params = lambda: (moe.router.weight, moe.w13, moe.w2)
    got = [out.detach().cpu(), xg.grad.cpu()] + [p.grad.cpu() for p in params()]
    moe.cpu().zero_grad()
    x64 = x.double().requires_grad_()
    keep = kept_by_score(moe, x, math.ceil(512 * 2 * capacity_factor / 8)) if capacity_factor else None
    ref = naive_moe(moe, x64, keep)
    ref.backward(dy.double())
    want = [ref.detach(), x64.grad] + [p.grad for p in params()]
    for name, g, w in zip(("out", "x", "router", "w13", "w2"), got, want):
        assert_close_scaled(g, w, 3e-2, name)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("compile,kernel", [(False, "auto"), (True, "auto"), (False, "triton")])
def test_gpu_moe_model_trains_20_steps(char_data, tmp_path, compile, kernel):
    run_train([*TINY_MOE, f"--out_dir={tmp_path}", "--max_iters=20", "--eval_interval=20", "--device=cuda",
               "--dtype=bfloat16", f"--compile={compile}", f"--moe_kernel={kernel}", "--capacity_factor=1.25",
               "--log_interval=1"], char_data)
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5]), losses  # it learns
