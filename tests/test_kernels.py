"""Every path of gemm_kernels.grouped_mm against a float64 loop over experts: Triton's scatter2scatter in its
interpreter (fp32, fp16), torch._grouped_mm (bf16, the only dtype it takes) and the per-expert loop (fp32).

TRITON_INTERPRET=1 has to be set before triton.jit wraps the kernels, and other test modules may import
kernels normally in this same pytest process, so the Triton kernels run in one child process: this file builds
the inputs, the child runs forward and backward on all of them (and one MoE layer on the triton path), and the
comparisons happen here.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from gemm_kernels import grouped_mm
from gemm_kernels import triton_gemm as tg
from model import GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Blocks of 32 (>= 16, as tl.dot needs on a GPU) so that M, K and N below span more than one tile with
# ragged edges, while the interpreter's grids stay small.
CHILD = r"""
import sys, traceback, torch
import gemm_kernels.triton_gemm as tg
small = [tg.Config(32, 64, 32, 4, 1), tg.Config(32, 32, 32, 4, 1)]  # N < 64 takes the second: both run
tg.CONFIGS = {kind: small for kind in tg.CONFIGS}
results = {}
cases = torch.load(sys.argv[1])
moe_case = cases.pop("moe")
for name, c in cases.items():
    try:
        x = c["x"].clone().requires_grad_(c["dy"] is not None)
        w = c["w"].clone().requires_grad_(c["dy"] is not None)
        y = tg.scatter2scatter(x, w, c["offsets"], c["gather_idx"], c["scatter_idx"], c["out_rows"])
        r = {"y": y.detach()}
        if c["dy"] is not None:
            y.backward(c["dy"])
            r["dx"], r["dw"] = x.grad, w.grad
        results[name] = r
    except Exception:
        results[name] = traceback.format_exc()
try:  # a whole MoE layer on the triton path, capacity dropping pairs: its output and gradients
    from model import GPTConfig
    from moe import MoE
    torch.manual_seed(0)
    moe = MoE(GPTConfig(n_layer=1, n_head=2, **moe_case["config"]))
    moe.load_state_dict(moe_case["state"])
    x = moe_case["x"].clone().requires_grad_()
    out = moe(x.view(1, *x.shape)).view(x.shape)
    out.backward(moe_case["dy"])
    results["moe"] = {"y": out.detach(), "dx": x.grad, **{n: p.grad for n, p in moe.named_parameters()}}
except Exception:
    results["moe"] = traceback.format_exc()
torch.save(results, sys.argv[2])
"""

E, K, N = 4, 48, 40


def offsets_of(sizes, dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=dtype)


def top2_routing(g, tokens, experts, drop):
    """Top-2 routing that never picks expert 2, sorted by expert, dropping the last `drop` pairs of
    expert 0 (as a capacity limit would): gather_idx repeats tokens, scatter_idx is the (token, k) slot."""
    choice = torch.stack([torch.randperm(experts - 1, generator=g)[:2] for _ in range(tokens)])
    choice[choice >= 2] += 1  # experts 0, 1, 3 only
    expert, slot = choice.flatten(), torch.arange(2 * tokens)
    order = torch.argsort(expert, stable=True)
    expert, slot = expert[order], slot[order]
    keep = torch.ones_like(expert, dtype=torch.bool)
    keep[torch.nonzero(expert == 0).flatten()[-drop:]] = False
    expert, slot = expert[keep], slot[keep]
    return torch.bincount(expert, minlength=experts).tolist(), slot // 2, slot


def make_cases():
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    cases = {}
    for dt in (torch.float32, torch.float16):
        tag = str(dt).split(".")[-1]
        # no gather, no scatter: the first and a middle expert are empty; M = 63, 2 tiles of 32 rows
        sizes = [0, 37, 0, 26]
        cases[f"neither_{tag}"] = dict(x=rand(63, K), w=rand(E, N, K), offsets=offsets_of(sizes),
                                       gather_idx=None, scatter_idx=None, out_rows=None, dy=rand(63, N))
        # gather only, with repeated rows; the last expert is empty; K = 20 and N = 24 are below a block
        sizes, M = [21, 24, 0], 45
        cases[f"gather_{tag}"] = dict(x=rand(30, 20), w=rand(3, 24, 20), offsets=offsets_of(sizes),
                                      gather_idx=torch.randint(0, 30, (M,), generator=g), scatter_idx=None,
                                      out_rows=None, dy=rand(M, 24))
        # scatter only into 80 rows, 30 of which nobody writes; int32 offsets
        sizes, M = [17, 0, 33, 0], 50
        cases[f"scatter_{tag}"] = dict(x=rand(M, K), w=rand(E, N, K), offsets=offsets_of(sizes, torch.int32),
                                       gather_idx=None, scatter_idx=torch.randperm(80, generator=g)[:M],
                                       out_rows=80, dy=rand(80, N))
        # top-2 gather + scatter with dropped pairs and an empty expert, forward and backward
        sizes, gidx, sidx = top2_routing(g, 35, E, drop=5)
        cases[f"top2_{tag}"] = dict(x=rand(35, K), w=rand(E, N, K), offsets=offsets_of(sizes), gather_idx=gidx,
                                    scatter_idx=sidx, out_rows=70, dy=rand(70, N))
        # 9 rows past the last group (pairs dropped for capacity, moved to the end): zero out, zero gradient
        sizes = [20, 0, 11, 30]
        cases[f"tail_{tag}"] = dict(x=rand(70, K), w=rand(E, N, K), offsets=offsets_of(sizes), gather_idx=None,
                                    scatter_idx=None, out_rows=None, dy=rand(70, N))
    # autocast-style: fp16 activations, fp32 weights (the weight gradient stays fp32)
    sizes, gidx, sidx = top2_routing(g, 20, E, drop=3)
    cases["mixed"] = dict(x=rand(20, K).half(), w=rand(E, N, K), offsets=offsets_of(sizes), gather_idx=gidx,
                          scatter_idx=sidx, out_rows=40, dy=rand(40, N).half())
    # no rows at all, with and without a scatter
    cases["empty_scatter"] = dict(x=rand(6, K), w=rand(E, N, K), offsets=torch.zeros(E + 1, dtype=torch.int64),
                                  gather_idx=torch.zeros(0, dtype=torch.int64),
                                  scatter_idx=torch.zeros(0, dtype=torch.int64), out_rows=5, dy=rand(5, N))
    cases["empty_sorted"] = dict(x=rand(0, K), w=rand(E, N, K), offsets=torch.zeros(E + 1, dtype=torch.int64),
                                 gather_idx=None, scatter_idx=None, out_rows=None, dy=rand(0, N))
    for name, c in cases.items():
        if name == "mixed":
            continue
        dt = torch.float16 if name.endswith("float16") else torch.float32
        for key in ("x", "w", "dy"):
            if c[key] is not None:
                c[key] = c[key].to(dt)
    return cases


CASES = make_cases()


def make_moe_case():
    """A MoE layer whose expert 0 is overloaded, capacity 1.0: groups ragged, pairs dropped to the end."""
    from moe import MoE
    config = dict(n_embd=16, n_expert=4, top_k=2, expert_hidden=24, capacity_factor=1.0, moe_kernel="triton")
    torch.manual_seed(0)
    moe = MoE(GPTConfig(n_layer=1, n_head=2, **config))
    with torch.no_grad():
        moe.router.weight[0, 0] += 3.0
    x = torch.randn(40, 16)
    x[:, 0] = torch.linspace(0.1, 2.0, 40)
    return dict(config=config, state=moe.state_dict(), x=x, dy=torch.randn(40, 16), moe=moe)


MOE_CASE = make_moe_case()


def reference(c):
    """float64 loop over experts: index the group's rows, matmul, scatter; differentiable."""
    x = c["x"].double().requires_grad_()
    w = c["w"].double().requires_grad_()
    M = len(c["gather_idx"]) if c["gather_idx"] is not None else len(x)
    y = torch.zeros(c["out_rows"] or M, w.shape[1], dtype=torch.float64)
    off = c["offsets"].tolist()
    for e in range(w.shape[0]):
        rows = torch.arange(off[e], off[e + 1])
        src = c["gather_idx"][rows] if c["gather_idx"] is not None else rows
        dst = c["scatter_idx"][rows] if c["scatter_idx"] is not None else rows
        y = y.index_put((dst,), x[src] @ w[e].t())
    if c["dy"] is None:
        return y.detach(), None, None
    y.backward(c["dy"].double())
    return y.detach(), x.grad, w.grad


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s2s")
    torch.save({**CASES, "moe": {k: v for k, v in MOE_CASE.items() if k != "moe"}}, tmp / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "cases.pt"), str(tmp / "out.pt")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "out.pt")


def check(name, results, what=("y",)):
    c, got = CASES[name], results[name]
    assert not isinstance(got, str), f"{name} raised in the kernel process:\n{got}"
    tol = 1e-2 if c["x"].dtype == torch.float16 else 1e-4
    ref = dict(zip(("y", "dx", "dw"), reference(c)))
    for key in what:
        assert got[key].dtype == (c["w"] if key == "dw" else c["x"]).dtype, (key, got[key].dtype)
        assert got[key].shape == ref[key].shape, (key, got[key].shape, ref[key].shape)
        scale = max(ref[key].abs().amax().item() if ref[key].numel() else 0.0, 1.0)
        torch.testing.assert_close(got[key].double(), ref[key], rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{name} {key}: {m}")
    return c, got


DTYPES = ["float32", "float16"]


@pytest.mark.parametrize("dt", DTYPES)
def test_plain_grouped_mm_matches_float64_with_empty_first_and_middle_experts(results, dt):
    check(f"neither_{dt}", results, ("y", "dx", "dw"))


@pytest.mark.parametrize("dt", DTYPES)
def test_gathered_rows_match_float64_with_an_empty_last_expert_and_small_k_n(results, dt):
    check(f"gather_{dt}", results, ("y", "dx", "dw"))


@pytest.mark.parametrize("dt", DTYPES)
def test_scatter_only_leaves_unwritten_rows_zero(results, dt):
    c, got = check(f"scatter_{dt}", results, ("y", "dx", "dw"))
    unwritten = torch.ones(c["out_rows"], dtype=torch.bool)
    unwritten[c["scatter_idx"]] = False
    assert unwritten.sum() == 30 and torch.all(got["y"][unwritten] == 0)


@pytest.mark.parametrize("dt", DTYPES)
def test_top2_gather_and_scatter_match_float64_forward_and_backward(results, dt):
    c, got = check(f"top2_{dt}", results, ("y", "dx", "dw"))
    assert c["offsets"][3] == c["offsets"][2], "the routing was meant to leave expert 2 empty"
    assert len(c["gather_idx"].unique()) < len(c["gather_idx"]), "the routing was meant to repeat tokens"
    assert torch.all(got["dw"][2] == 0), "an empty expert's weight gradient must be exactly zero"
    dropped = torch.ones(c["out_rows"], dtype=torch.bool)
    dropped[c["scatter_idx"]] = False
    assert dropped.any() and torch.all(got["y"][dropped] == 0)


@pytest.mark.parametrize("name,shape", [("empty_scatter", (5, N)), ("empty_sorted", (0, N))])
def test_zero_rows_give_zero_outputs_and_gradients(results, name, shape):
    c, got = check(name, results, ("y", "dx", "dw"))
    assert got["y"].shape == shape and torch.all(got["y"] == 0)
    assert torch.all(got["dx"] == 0) and torch.all(got["dw"] == 0)


def test_imports_without_triton_and_says_why_on_use(monkeypatch):
    import importlib.util
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError, as with none installed
    spec = importlib.util.spec_from_file_location("triton_gemm_without_triton", tg.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a fresh copy of the module; tg keeps its triton
    assert module.triton is None
    with pytest.raises(RuntimeError, match="needs triton"):
        module.scatter2scatter(torch.zeros(2, 3), torch.zeros(1, 3, 4), torch.tensor([0, 2]))


def test_fp16_activations_with_fp32_weights_match_float64(results):
    check("mixed", results, ("y", "dx", "dw"))


@pytest.mark.parametrize("dt", DTYPES)
def test_rows_past_the_last_group_come_back_zero_with_zero_gradient(results, dt):
    c, got = check(f"tail_{dt}", results, ("y", "dx", "dw"))
    assert torch.all(got["y"][61:] == 0) and torch.all(got["dx"][61:] == 0)


def test_moe_layer_on_the_triton_path_matches_float64(results):
    from test_moe import kept_by_score, naive_moe
    got = results["moe"]
    assert not isinstance(got, str), f"the MoE layer raised in the kernel process:\n{got}"
    moe, x = MOE_CASE["moe"], MOE_CASE["x"].clone().requires_grad_()
    keep = kept_by_score(moe, x, capacity=20)
    assert (~keep).any()
    ref = naive_moe(moe, x, keep)
    ref.backward(MOE_CASE["dy"].double())
    want = {"y": ref.detach(), "dx": x.grad, **{n: p.grad for n, p in moe.named_parameters()}}
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key].double(), rtol=1e-4, atol=1e-5, msg=key)


# the other two paths run in this process: the loop on every case in fp32, torch._grouped_mm on the sorted-row cases
# (it takes no gather or scatter index) in bf16
LOOP_CASES = [n for n in CASES if n.endswith("float32") or n.startswith("empty")]
SORTED_CASES = ["neither_float32", "tail_float32", "empty_sorted"]


def run_path(kernel, c, dtype):
    x = c["x"].to(dtype, copy=True).requires_grad_()  # a copy: the shared case must stay a plain tensor
    w = c["w"].to(dtype, copy=True).requires_grad_()
    y = grouped_mm(x, w, c["offsets"], kernel, c["gather_idx"], c["scatter_idx"], c["out_rows"])
    y.backward(c["dy"].to(dtype))
    zero = lambda t, grad: torch.zeros_like(t) if grad is None else grad  # nothing reached it: no rows
    return {"y": y.detach(), "dx": zero(x, x.grad), "dw": zero(w, w.grad)}


@pytest.mark.parametrize("kernel,names,dtype,tol", [("loop", LOOP_CASES, torch.float32, 1e-5),
                                                    ("grouped_mm", SORTED_CASES, torch.bfloat16, 2e-2)])
def test_loop_and_torch_grouped_mm_match_float64(kernel, names, dtype, tol):
    for name in names:
        c = CASES[name]
        got, ref = run_path(kernel, c, dtype), dict(zip(("y", "dx", "dw"), reference(c)))
        ref["dx"] = torch.zeros_like(c["x"], dtype=torch.float64) if ref["dx"] is None else ref["dx"]
        for key in ref:
            assert got[key].dtype == dtype
            scale = max(ref[key].abs().amax().item() if ref[key].numel() else 0.0, 1.0)
            torch.testing.assert_close(got[key].double(), ref[key], rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"{kernel} {name} {key}: {m}")
        if name.startswith("tail"):
            assert torch.all(got["y"][61:] == 0) and torch.all(got["dx"][61:] == 0)


def test_grouped_mm_path_refuses_other_dtypes_and_auto_picks_by_device_and_dtype():
    c = CASES["neither_float32"]
    with pytest.raises(ValueError, match="bfloat16 only"):
        grouped_mm(c["x"], c["w"], c["offsets"], "grouped_mm")
    from gemm_kernels import pick
    x, w = c["x"], c["w"]  # K = 48, N = 40
    assert pick("auto", x.bfloat16(), w.bfloat16()) == "grouped_mm" and pick("auto", x, w) == "loop"
    assert pick("auto", x.bfloat16(), w[:, :36].bfloat16()) == "loop"  # rows of 72 bytes: not for CUTLASS
    assert pick("triton", x, w) == "triton"


# The launch configs compiled for real GPUs on this CPU (triton.compile for a GPU target, no GPU): shared memory from
# the compiler, registers and spills from the cubin (cuobjdump). Every launch of every config for every GPU takes
# minutes (python -m gemm_kernels.triton_gemm prints the table, docs/moe.md holds it): that test is slow; the fast
# one compiles, for each GPU, the config it picks for a wide bf16 layer.
def check_compiled(rows):
    for r in rows:
        name = f"{' '.join(map(str, r['config']))} {r['dtype']} on sm{r['cc']}"
        assert r["shared"] <= r["bound"], f"{name}: {r['shared']} bytes of shared memory, over the bound the pick uses"
        if r["picked"]:
            assert r["shared"] <= tg.GPUS[r["cc"]][1], f"{name}: {r['shared']} bytes of shared memory do not fit"
            assert r["spills"] == 0, f"{name}: {r['spills']} bytes of registers spilled per thread"
        for block in r["config"][:3]:  # tl.dot: >= 16 on a GPU; tl.arange: powers of two
            assert block >= 16 and block & (block - 1) == 0, name


@pytest.mark.parametrize("cc", list(tg.GPUS))
def test_the_config_each_gpu_picks_for_a_wide_bf16_layer_compiles_for_it_within_its_shared_memory(cc):
    pytest.importorskip("triton")
    cfg = tg.pick_config(torch.bfloat16, 4096, tg.GPUS[cc][1])
    shared, regs, spills = tg.compile_for(cc, *tg.launches(cfg, torch.bfloat16, "tf32")["gather+scatter"])
    check_compiled([dict(config=cfg, dtype="bfloat16", cc=cc, shared=shared, regs=regs, spills=spills,
                         bound=tg.smem_bytes(cfg, 2), picked=True)])
    assert 0 < regs <= 255


@pytest.mark.slow
def test_every_triton_config_compiles_for_sm80_86_89_90_and_each_gpu_picks_only_those_that_fit():
    pytest.importorskip("triton")
    rows = tg.compile_table()
    print(tg.format_table(rows))
    check_compiled(rows)
    assert len(rows) == sum(len(c) * len(tg.SERVES[k]) for k, c in tg.CONFIGS.items()) * len(tg.GPUS)
    for cc in tg.GPUS:  # every kind of input has a config on every GPU
        assert {r["kind"] for r in rows if r["cc"] == cc and r["picked"]} == set(tg.CONFIGS), cc


def test_each_gpu_picks_the_widest_config_its_shared_memory_holds_queried_once(monkeypatch):
    queried = []

    class Props:
        shared_memory_per_block_optin = 99 * 1024

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: queried.append(device) or Props())
    tg.smem_limit.cache_clear()
    try:
        assert [tg.smem_limit(torch.device("cuda", 0)) for _ in range(3)] == [99 * 1024] * 3 and len(queried) == 1
    finally:
        tg.smem_limit.cache_clear()
    assert tg.smem_limit(torch.device("cpu")) == 99 * 1024  # the interpreter: the smallest GPU's
    big, mid, narrow = tg.CONFIGS["16-bit"]
    # by hand: 3 stages of (64 x 128 + 128 x 128) bf16 tiles for dW are 144 KB; of (64 x 64 + 64 x 128), 72 KB
    assert tg.smem_bytes(big, 2) == 144 * 1024 and tg.smem_bytes(mid, 2) == 72 * 1024
    for cc, (_, smem) in tg.GPUS.items():  # A100 and H100 hold the 128 x 128 tiles; the 99 KB cards do not
        assert tg.pick_config(torch.bfloat16, 4096, smem) == (big if smem >= 144 * 1024 else mid), cc
        assert tg.pick_config(torch.float16, 64, smem) == narrow, cc
    with tg._matmul_precision("high"):  # fp32 on tf32 tensor cores, as train.py sets it
        assert tg.pick_config(torch.float32, 16, 99 * 1024) == tg.CONFIGS["tf32"][-1]
    with tg._matmul_precision("highest"):  # fp32 without tf32: its own, register-bound config
        assert tg.pick_config(torch.float32, 4096, 99 * 1024) == tg.CONFIGS["ieee"][0]


# The gpu-marked tests (tests/gpu_check.py runs them on a GPU): skipped without CUDA
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_paths():
    paths = [("triton", torch.bfloat16), ("triton", torch.float16), ("loop", torch.bfloat16), ("loop", torch.float16)]
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        paths.append(("grouped_mm", torch.bfloat16))
    return paths


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kernel,dtype", gpu_paths())
def test_gpu_paths_match_float64_on_ragged_groups_without_host_syncs(kernel, dtype):
    g = torch.Generator().manual_seed(0)
    E, K, N = 8, 256, 320
    sizes = [0, 300, 17, 0, 128, 1, 250, 0]  # empty first, middle and last experts; 40 rows past the last group
    M = sum(sizes) + 40
    c = dict(x=torch.randn(M, K, generator=g), w=torch.randn(E, N, K, generator=g) / K ** 0.5,
             offsets=offsets_of(sizes), gather_idx=None, scatter_idx=None, out_rows=None,
             dy=torch.randn(M, N, generator=g))
    ref = dict(zip(("y", "dx", "dw"), reference(c)))
    x = c["x"].cuda().to(dtype).requires_grad_()
    w = c["w"].cuda().to(dtype).requires_grad_()
    offsets, dy = c["offsets"].cuda(), c["dy"].cuda().to(dtype)
    grouped_mm(x, w, offsets, kernel).backward(dy)  # the first call compiles (Triton) and may sync; not timed
    x.grad = w.grad = None
    torch.cuda.synchronize()
    if kernel != "loop":  # the loop reads the group sizes on the host by design
        torch.cuda.set_sync_debug_mode("error")
    try:
        y = grouped_mm(x, w, offsets, kernel)
        y.backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = {"y": y.detach(), "dx": x.grad, "dw": w.grad}
    for key in ref:
        scale = ref[key].abs().max().item()
        err = (got[key].double().cpu() - ref[key]).abs().max().item()
        assert err <= 2e-2 * scale, (kernel, dtype, key, err, scale)
    assert torch.all(got["y"][-40:] == 0) and torch.all(got["dx"][-40:] == 0)


# tests/gpu_check.py, the one-command GPU check: its verdicts here with each part's process faked (fast), and its
# dry form on the CPU for real (slow: seven processes, about a minute on 2 cores)
def fake_part(losses, pytest_summary):
    def run(cmd, device, cwd=ROOT, timeout=600):
        arg = lambda key, default=None: next((a.split("=", 1)[1] for a in cmd if a.startswith(f"--{key}=")), default)
        if "pytest" in cmd:
            return 0, f"...\n{pytest_summary}", 1.0
        if cmd[1] == "bench.py":
            kernels = arg("moe_kernel", "-").split(",")
            rows = [dict(variant=k, ms_per_iter=2.0, tokens_per_s=500.0, mfu=0.4) for k in kernels]
            with open(arg("json_out"), "w") as f:
                json.dump(dict(params=10, tokens_per_iter=1000, peak_mib=3.0, rows=rows), f)
        elif cmd[1].endswith("train.py"):
            os.makedirs(arg("out_dir"))
            with open(os.path.join(arg("out_dir"), "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps({"iter": i + 1, "loss": loss}) + "\n" for i, loss in enumerate(losses))
        return 0, "", 1.0
    return run


@pytest.mark.parametrize("device,losses,summary,ok", [
    ("cpu", [10.0] * 5 + [6.0] * 45, "15 skipped, 52 deselected in 5.0s", True),
    ("cpu", [10.0] * 5 + [9.5] * 45, "15 skipped, 52 deselected in 5.0s", False),  # fell by 5%, not the 10% it must
    ("cpu", [10.0] * 5 + [6.0] * 44, "15 skipped, 52 deselected in 5.0s", False),  # 49 steps logged, not 50
    ("cuda", [10.0] * 5 + [6.0] * 45, "13 passed, 2 skipped, 52 deselected in 50.0s", True),
    ("cuda", [10.0] * 5 + [6.0] * 45, "15 skipped, 52 deselected in 5.0s", False)])  # the tests saw no GPU
def test_gpu_check_passes_only_when_every_part_does(monkeypatch, tmp_path, capsys, device, losses, summary, ok):
    import gpu_check
    monkeypatch.setattr(gpu_check, "run", fake_part(losses, summary))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    assert gpu_check.main([f"--device={device}", f"--out={tmp_path / 'check.json'}"]) == (0 if ok else 1)
    res = json.loads((tmp_path / "check.json").read_text())
    assert res["ok"] == ok and [r["part"] for r in res["rows"]] == ["gpu tests", "dense 124M", *["moe 4 layers"] * (
        3 if device == "cuda" else 2), "train 50 steps"]
    assert ("FAIL" in capsys.readouterr().out) != ok


@pytest.mark.slow
def test_gpu_check_dry_form_runs_every_part_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join("tests", "gpu_check.py"), "--device=cpu",
                           f"--out={tmp_path / 'check.json'}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "check.json").read_text())
    rows = {(r["part"], r["what"]): r for r in res["rows"]}
    assert "skipped" in rows["gpu tests", "pytest -m gpu"]["result"]  # no CUDA: each gpu test skips, none fails
    assert {k for k in rows if k[0] == "moe 4 layers"} == {("moe 4 layers", "bfloat16 grouped_mm"),
                                                          ("moe 4 layers", "bfloat16 loop")}
    assert all(r["tokens_per_s"] > 0 for r in res["rows"] if "tokens_per_s" in r)
    losses = rows["train 50 steps", "medium_moe tiny"]["losses"]
    assert len(losses) == 50 and sum(losses[-5:]) < sum(losses[:5]) - 5  # by hand: falls by over 1 nat on average
