"""Grouped GEMM for Mixture-of-Experts over expert-sorted rows, with the gather and scatter fused in.

Sorted row i belongs to expert e iff offsets[e] <= i < offsets[e+1] (groups ragged, possibly empty; rows at or past
offsets[E] belong to none and are not computed) and computes x[gather_idx[i]] @ w[e].T into y[scatter_idx[i]], w[e]
being (out, in) as nn.Linear keeps it (either index None: the identity). Fusing the indexing into the loads and
stores (ScatterMoE's scatter2scatter) means no sorted copy of x, no padding per expert, one launch for all experts.
Row tiles never straddle two experts: each program finds its expert by counting tile ends. Backward: grad_x reuses
the forward kernel on (dy, w) with the indices' roles swapped; grad_w has its own kernel. Nothing syncs with the
host: the tile schedule is built on the device and the grid sized from shapes alone.
"""
import contextlib
import functools
import os
from collections import namedtuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install may have no triton; fail on use, not on import
    triton = None

# Launch configs by kind of input (16-bit; fp32 on tf32 tensor cores; fp32 in full precision, "ieee", which runs
# on FMA units and is bound by registers), in order of preference: a launch takes the first that fits the GPU's
# shared memory (by smem_bytes) and whose BLOCK_N is at most its N (else the last that fits). Not timed (no GPU
# here; autotune would need one): 128 x 128 tiles of 8 warps first, for A100 and H100 (ScatterMoE's 128-row tiles),
# then 64-row tiles that fit the 99 KB of L4, A10, L40S and RTX cards. compile_table compiles each one for
# sm80/86/89/90 and the tests check that a picked config fits its GPU and spills no registers (docs/moe.md).
# The interpreter's tests swap in small blocks (never below 16: tl.dot needs 16 per dimension on a GPU).
Config = namedtuple("Config", "BLOCK_M BLOCK_N BLOCK_K num_warps num_stages")
CONFIGS = {"16-bit": [Config(128, 128, 64, 8, 3), Config(64, 128, 64, 4, 3), Config(64, 64, 64, 4, 4)],
           "tf32": [Config(64, 128, 32, 4, 2), Config(64, 64, 32, 4, 3)],
           "ieee": [Config(64, 64, 32, 8, 2)]}  # the tf32 ones spill registers here on sm80
# compute capability -> (GPUs, shared memory per block that a kernel may opt in to)
GPUS = {80: ("A100", 163 * 1024), 86: ("A10, RTX 30", 99 * 1024), 89: ("L4, L40S, RTX 40", 99 * 1024),
        90: ("H100", 227 * 1024)}


def smem_bytes(cfg, element_size):
    """A bound on one block's shared memory, which compile_table checks on every GPU: num_stages copies of the larger
    operand pair of the two kernels, (BLOCK_M x BLOCK_K) + (BLOCK_K x BLOCK_N) for the GEMM and (BLOCK_K x BLOCK_M)
    + (BLOCK_M x BLOCK_N) for dW (sm90 keeps num_stages copies, sm80-89 one fewer)."""
    m, n, k = cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K
    return cfg.num_stages * max(k * (m + n), m * (k + n)) * element_size


@functools.cache
def smem_limit(device):
    """Shared memory per block on device, queried once per device; the interpreter (CPU) gets the smallest GPU's."""
    if device.type != "cuda":
        return min(limit for _, limit in GPUS.values())
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _kind(dtype):
    return "16-bit" if dtype.itemsize == 2 else _precision(dtype)


def pick_config(dtype, N, smem):
    size = dtype.itemsize
    configs = [c for c in CONFIGS[_kind(dtype)] if smem_bytes(c, size) <= smem]
    return next((c for c in configs if c.BLOCK_N <= N), configs[-1])


if triton is not None:

    @triton.jit
    def _s2s_kernel(x_ptr, w_ptr, y_ptr, off_ptr, tile_off_ptr, gidx_ptr, sidx_ptr, K, N,
                    sxm, sxk, swe, swk, swn, sym, syn, E,
                    E_POW2: tl.constexpr, HAS_GATHER: tl.constexpr, HAS_SCATTER: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        # The expert of this tile is the number of experts whose tiles all end at or before it; empty
        # experts own no tiles, so they are skipped for free.
        ex = tl.arange(0, E_POW2)
        tile_end = tl.load(tile_off_ptr + 1 + ex, mask=ex < E, other=2**30)
        e = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
        if e >= E:  # the grid is an upper bound on the tile count; the spare programs do nothing
            return
        row_start = tl.load(off_ptr + e) + (pid_m - tl.load(tile_off_ptr + e)) * BLOCK_M
        row_end = tl.load(off_ptr + e + 1)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        src = tl.load(gidx_ptr + rows, mask=row_ok, other=0) if HAS_GATHER else rows
        dst = tl.load(sidx_ptr + rows, mask=row_ok, other=0) if HAS_SCATTER else rows
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        w_base = w_ptr + e.to(tl.int64) * swe
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k0 + ks < K
            a = tl.load(x_ptr + src[:, None] * sxm + (k0 + ks)[None, :] * sxk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_base + (k0 + ks)[:, None] * swk + cols[None, :] * swn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(y_ptr + dst[:, None] * sym + cols[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _dw_kernel(x_ptr, dy_ptr, dw_ptr, off_ptr, gidx_ptr, sidx_ptr, K, N,
                   sxm, sxk, sym, syn, swe, swk, swn,
                   HAS_GATHER: tl.constexpr, HAS_SCATTER: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # One program owns one (expert, K-tile, N-tile) block of dW and sums over all of that expert's
        # rows, so no atomics are needed and an empty expert runs zero iterations and stores zeros.
        e, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        row_start = tl.load(off_ptr + e)
        row_end = tl.load(off_ptr + e + 1)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok, col_ok = ks < K, cols < N
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            src = tl.load(gidx_ptr + rows, mask=row_ok, other=0) if HAS_GATHER else rows
            dst = tl.load(sidx_ptr + rows, mask=row_ok, other=0) if HAS_SCATTER else rows
            xt = tl.load(x_ptr + src[None, :] * sxm + ks[:, None] * sxk,
                         mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            dy = tl.load(dy_ptr + dst[:, None] * sym + cols[None, :] * syn,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
        tl.store(dw_ptr + e.to(tl.int64) * swe + ks[:, None] * swk + cols[None, :] * swn,
                 acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


def _precision(dtype):
    # Only fp32 inputs are affected. Follow torch's own switch (nanoGPT's train.py turns TF32 on), so
    # the kernel is exactly as precise as the torch.matmul it replaces.
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


def _s2s_launch(x, w, offsets, gidx, sidx, y, cfg):
    """The forward kernel, its grid and arguments for y[sidx[i]] = x[gidx[i]] @ w[e(i)] over every sorted row i
    (a missing index is the identity); w here is (E, K, N)."""
    M = (gidx if gidx is not None else x).shape[0]
    E, K, N = w.shape
    sizes = offsets[1:] - offsets[:-1]
    tile_off = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
    tile_off[1:] = torch.cumsum((sizes + cfg.BLOCK_M - 1) // cfg.BLOCK_M, 0)
    # sum_e ceil(size_e / BM) <= ceil(M / BM) + E - 1, so this grid covers every tile without a sync
    grid = (triton.cdiv(M, cfg.BLOCK_M) + E - 1, triton.cdiv(N, cfg.BLOCK_N))
    dummy = offsets  # stands in for an absent index; never read (HAS_* is False)
    args = (x, w, y, offsets, tile_off, gidx if gidx is not None else dummy, sidx if sidx is not None else dummy,
            K, N, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1), E)
    meta = dict(E_POW2=triton.next_power_of_2(E), HAS_GATHER=gidx is not None, HAS_SCATTER=sidx is not None,
                PRECISION=_precision(x.dtype), **cfg._asdict())
    return _s2s_kernel, grid, args, meta


def _dw_launch(x, dy, grad_w, offsets, gidx, sidx, cfg):
    """The weight-gradient kernel, its grid and arguments: grad_w[e] = sum over e's rows of x[gidx]^T dy[sidx]."""
    E, N, K = grad_w.shape
    grid = (E, triton.cdiv(K, cfg.BLOCK_K), triton.cdiv(N, cfg.BLOCK_N))
    dummy = offsets
    args = (x, dy, grad_w, offsets, gidx if gidx is not None else dummy, sidx if sidx is not None else dummy, K, N,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), grad_w.stride(0), grad_w.stride(2),
            grad_w.stride(1))
    meta = dict(HAS_GATHER=gidx is not None, HAS_SCATTER=sidx is not None, PRECISION=_precision(x.dtype),
                **cfg._asdict())
    return _dw_kernel, grid, args, meta


def _launch(kernel, grid, args, meta):
    kernel[grid](*args, **meta)


def _launch_s2s(x, w, offsets, gidx, sidx, y):
    M = (gidx if gidx is not None else x).shape[0]
    if M > 0 and w.shape[2] > 0:
        cfg = pick_config(x.dtype, w.shape[2], smem_limit(x.device))
        _launch(*_s2s_launch(x, w, offsets, gidx, sidx, y, cfg))
    return y


class _Scatter2Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, gather_idx, scatter_idx, out_rows):
        wc = w.to(x.dtype)  # under autocast the weights stay fp32 while x is bf16; tl.dot wants one dtype
        # zeros: rows no sorted row writes to (dropped pairs, rows past the last group) must read as zero
        y = torch.zeros(out_rows, w.shape[1], dtype=x.dtype, device=x.device)
        _launch_s2s(x, wc.transpose(1, 2), offsets, gather_idx, scatter_idx, y)
        ctx.save_for_backward(x, wc, offsets, gather_idx, scatter_idx)
        ctx.w_dtype = w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets, gidx, sidx = ctx.saved_tensors
        E, N, K = w.shape
        M = (gidx if gidx is not None else x).shape[0]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # dx for sorted row i is dy[sidx[i]] @ w[e]: the forward kernel on w untransposed, with the
            # indices' roles swapped. With a gather, tokens read by several rows (top-k) sum their rows' gradients;
            # index_put_(accumulate=True) does that deterministically on CUDA, unlike index_add_.
            acc_dtype = torch.float32 if gidx is not None else x.dtype
            dxs = torch.zeros(M, K, dtype=acc_dtype, device=x.device)
            _launch_s2s(dy, w, offsets, sidx, None, dxs)
            if gidx is None:
                grad_x = dxs
            else:
                grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
                grad_x.index_put_((gidx,), dxs, accumulate=True)
                grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(E, N, K, dtype=ctx.w_dtype, device=x.device)
            if M > 0 and K > 0 and N > 0:
                cfg = pick_config(x.dtype, N, smem_limit(x.device))
                _launch(*_dw_launch(x, dy, grad_w, offsets, gidx, sidx, cfg))
        return grad_x, grad_w, None, None, None, None


def scatter2scatter(x, w, offsets, gather_idx=None, scatter_idx=None, out_rows=None):
    """y[scatter_idx[i]] = x[gather_idx[i]] @ w[e].T for each expert-sorted row i of group e.

    x: [Nx, K] (or [M, K] in sorted order when gather_idx is None); w: [E, N, K]; offsets: int [E+1]
    group boundaries over the M sorted rows (rows at or past offsets[E] belong to no group); gather_idx /
    scatter_idx: int64 [M] or None (identity; scatter_idx must be unique). Returns [out_rows, N] (rows nobody
    writes are zero; out_rows defaults to M) in x's dtype, accumulated in fp32. Differentiable w.r.t. x and w.
    """
    if triton is None:
        raise RuntimeError("gemm_kernels.triton_gemm.scatter2scatter needs triton (pip install triton)")
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise ValueError(f"expected x [rows, K] and w [E, N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if any(t is not None and t.device != x.device for t in (w, offsets, gather_idx, scatter_idx)):
        raise ValueError("w, offsets and the index tensors must be on x's device")
    if offsets.shape != (w.shape[0] + 1,):
        raise ValueError(f"offsets must have E+1 = {w.shape[0] + 1} entries, got {tuple(offsets.shape)}")
    M = (gather_idx if gather_idx is not None else x).shape[0]
    if scatter_idx is not None and scatter_idx.shape[0] != M:
        raise ValueError(f"scatter_idx has {scatter_idx.shape[0]} rows, expected {M}")
    out_rows = M if out_rows is None else out_rows
    if scatter_idx is None and out_rows != M:
        raise ValueError("out_rows other than M needs a scatter_idx")
    if out_rows < M:
        raise ValueError(f"out_rows ({out_rows}) must be >= the {M} sorted rows")
    if gather_idx is not None:
        gather_idx = gather_idx.long()
    if scatter_idx is not None:
        scatter_idx = scatter_idx.long()
    return _Scatter2Scatter.apply(x, w, offsets.long(), gather_idx, scatter_idx, out_rows)


def compile_for(cc, kernel, args, meta):
    """One launch compiled as the JIT would compile it on a GPU of compute capability cc, on this machine, no GPU
    needed: the JIT's own specialization of the arguments (16-byte alignment, strides of 1), then triton.compile for
    that target. Returns (shared memory bytes, registers per thread, stack bytes per thread): a Triton kernel holds
    no local arrays, so its stack is spilled registers."""
    import re
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    bound, spec, options = create_function_from_signature(kernel.signature, kernel.params, backend)(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, spec, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return compiled.metadata.shared, int(regs), int(stack)


# what each kind of config serves: (dtype, the tl.dot precision)
SERVES = {"16-bit": [(torch.bfloat16, "tf32"), (torch.float16, "tf32")], "tf32": [(torch.float32, "tf32")],
          "ieee": [(torch.float32, "ieee")]}


def launches(cfg, dtype, precision):
    """The four launches a training step can make with cfg, on tensors whose strides a model's have (multiples of
    16; the JIT specializes on that): the forward without and with gather and scatter (moe.py uses the first), the
    input gradient (fp32 output) and the weight gradient."""
    E, M, K, N = 8, 64, 64, 128
    x, dy, w = torch.zeros(M, K, dtype=dtype), torch.zeros(M, N, dtype=dtype), torch.zeros(E, N, K, dtype=dtype)
    offsets, idx = torch.zeros(E + 1, dtype=torch.int64), torch.arange(M)
    calls = {"forward": _s2s_launch(x, w.transpose(1, 2), offsets, None, None, dy, cfg),
             "gather+scatter": _s2s_launch(x, w.transpose(1, 2), offsets, idx, idx, dy, cfg),
             "dx": _s2s_launch(dy, w, offsets, idx, None, x.float(), cfg),
             "dW": _dw_launch(x, dy, torch.zeros_like(w), offsets, idx, idx, cfg)}
    return {name: (kernel, args, {**meta, "PRECISION": precision}) for name, (kernel, _, args, meta) in calls.items()}


def compile_table(ccs=tuple(GPUS), kinds=tuple(CONFIGS)):
    """Every launch config x each dtype it serves x each GPU in ccs, compiled:
    one row each with the largest shared memory, registers and spill bytes over its four launches, and whether the
    GPU picks it (its smem_bytes bound fits the GPU's shared memory)."""
    rows = []
    for kind in kinds:
        for cfg in CONFIGS[kind]:
            for dtype, precision in SERVES[kind]:
                for cc in ccs:
                    usage = [compile_for(cc, *call) for call in launches(cfg, dtype, precision).values()]
                    shared, regs, spills = (max(u[i] for u in usage) for i in range(3))
                    rows.append(dict(kind=kind, config=cfg, dtype=f"{str(dtype)[6:]}{' ieee' * (kind == 'ieee')}",
                                     cc=cc, shared=shared, regs=regs, spills=spills,
                                     bound=smem_bytes(cfg, dtype.itemsize),
                                     picked=smem_bytes(cfg, dtype.itemsize) <= GPUS[cc][1]))
    return rows


def format_table(rows):
    """rows of compile_table as text: a line per config and dtype, a column per GPU of shared KB / registers /
    spill bytes ('-' where the GPU never picks the config), then what each GPU picks for wide and narrow layers."""
    ccs = sorted({r["cc"] for r in rows})
    head = [f"sm{cc} {GPUS[cc][1] // 1024} KB" for cc in ccs]
    lines = [f"{'config (M N K warps stages)':<28}{'dtype':<14}{'bound':>7}  " + "".join(f"{h:<16}" for h in head)]
    cells = {}
    for r in rows:
        key = (" ".join(map(str, r["config"])), r["dtype"], f"{r['bound'] // 1024} KB")
        cells.setdefault(key, {})[r["cc"]] = f"{'' if r['picked'] else '- '}{r['shared'] // 1024} KB/{r['regs']}/" \
                                             f"{r['spills']}"
    for (cfg, dtype, bound), by_cc in cells.items():
        lines.append(f"{cfg:<28}{dtype:<14}{bound:>7}  " + "".join(f"{by_cc.get(cc, ''):<16}" for cc in ccs))
    lines.append("per GPU: shared memory / registers per thread / spilled bytes per thread, the largest of the")
    lines.append("forward (plain, gather+scatter), dx and dW launches; '-': that GPU never picks the config")
    lines.append("; ".join(f"sm{cc}: {GPUS[cc][0]}" for cc in ccs))
    dtypes = {"16-bit": torch.bfloat16, "tf32": torch.float32, "ieee": torch.float32}
    for cc in ccs:
        picks = []
        for kind in sorted({r["kind"] for r in rows}, key=list(CONFIGS).index):
            with _matmul_precision("highest" if kind == "ieee" else "high"):
                wide, narrow = (" ".join(map(str, pick_config(dtypes[kind], n, GPUS[cc][1]))) for n in (4096, 64))
            picks.append(f"{kind} {wide}" + (f" (N < {wide.split()[1]}: {narrow})" if narrow != wide else ""))
        lines.append(f"sm{cc} picks: " + "; ".join(picks))
    return "\n".join(line.rstrip() for line in lines)


@contextlib.contextmanager
def _matmul_precision(precision):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


if __name__ == "__main__":  # python -m gemm_kernels.triton_gemm: the compile table of docs/moe.md (minutes)
    print(format_table(compile_table()))
