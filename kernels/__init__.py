"""
The grouped GEMM at the heart of a Mixture-of-Experts layer, and the one function that picks how to run it. Rows
(token copies) arrive sorted by expert: rows offsets[e]:offsets[e+1] belong to expert e, and

    y[scatter_idx[i]] = x[gather_idx[i]] @ w[e]

On CUDA it is one Triton launch for all experts, the gather and scatter fused into the matmul's loads and stores
(ScatterMoE's scatter2scatter, kernels/triton_gemm.py); elsewhere one matmul per expert on its contiguous slice.
"""

import torch


def grouped_mm(x, w, offsets, gather_idx=None, scatter_idx=None, out_rows=None):
    """x: (Nx, K); w: (E, K, N); offsets: (E+1,) int, offsets[-1] = M rows; gather_idx / scatter_idx: (M,) int64 or
    None; returns (out_rows or M, N), zero in rows nothing was scattered to. Differentiable in x and w."""
    if x.is_cuda:
        from kernels.triton_gemm import scatter2scatter  # imported only here: CPU machines never touch Triton
        return scatter2scatter(x, w, offsets, gather_idx, scatter_idx, out_rows)
    return _grouped_mm_loop(x, w, offsets, gather_idx, scatter_idx, out_rows)


def _grouped_mm_loop(x, w, offsets, gather_idx, scatter_idx, out_rows):
    xs = x if gather_idx is None else x.index_select(0, gather_idx)
    y = _LoopGroupedMM.apply(xs, w, offsets.tolist())
    if scatter_idx is None:
        return y
    return y.new_zeros(out_rows, y.shape[1]).index_copy(0, scatter_idx, y)


class _LoopGroupedMM(torch.autograd.Function):
    """One matmul per expert on its contiguous slice of the sorted rows, written into a shared output. Its own
    backward, because autograd's for slicing and indexing would give each of the E slices and E weights a gradient
    the size of the whole tensor (zeros, then added up): measured, that was a third of the layer's time."""

    @staticmethod
    def forward(ctx, xs, w, bounds):
        ctx.save_for_backward(xs, w)
        ctx.bounds = bounds
        y = xs.new_empty(xs.shape[0], w.shape[2])
        for e, (a, b) in enumerate(zip(bounds, bounds[1:])):
            torch.mm(xs[a:b], w[e], out=y[a:b])
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, w = ctx.saved_tensors
        dxs, dw = torch.empty_like(xs), torch.empty_like(w)
        for e, (a, b) in enumerate(zip(ctx.bounds, ctx.bounds[1:])):
            torch.mm(dy[a:b], w[e].t(), out=dxs[a:b])
            torch.mm(xs[a:b].t(), dy[a:b], out=dw[e])  # an empty slice gives zeros
        return dxs, dw, None
