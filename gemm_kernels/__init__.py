"""
The grouped GEMM at the heart of a Mixture-of-Experts layer, and the one function that picks how to run it. Rows
(token copies) arrive sorted by expert: rows offsets[e]:offsets[e+1] belong to expert e, and

    y[scatter_idx[i]] = x[gather_idx[i]] @ w[e].T        (w[e] is (out, in), as nn.Linear keeps its weight)

Rows at or past offsets[-1] belong to no expert: they come back zero and pass no gradient. Three ways to run it,
chosen by moe_kernel (GPTConfig):
- 'grouped_mm': PyTorch's torch._grouped_mm (CUTLASS on sm90+ GPUs, also on the CPU), bfloat16 only;
- 'triton': one Triton launch for all experts, gather and scatter fused into the loads and stores (ScatterMoE's
  scatter2scatter, gemm_kernels/triton_gemm.py), for other CUDA GPUs and other dtypes;
- 'loop': one matmul per expert on its contiguous slice, anywhere (it reads the group sizes on the host);
- 'auto': grouped_mm where PyTorch supports it (bfloat16 on the CPU or an sm90+ GPU, widths multiples of 8), else
  triton on CUDA, else loop.
The folder is not called kernels/: that is a PyPI package transformers imports, which a folder of that name in
the working directory would hide.
"""

import os

import torch

KERNELS = ("auto", "grouped_mm", "triton", "loop")


def pick(kernel, x, w):
    """The path 'auto' stands for on x's device and dtype; any other choice as given."""
    if kernel != "auto":
        return kernel
    aligned = w.shape[1] % 8 == 0 and w.shape[2] % 8 == 0  # CUTLASS wants rows of 16-byte multiples
    if x.dtype == torch.bfloat16 and aligned and (not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] >= 9):
        return "grouped_mm"
    return "triton" if x.is_cuda else "loop"


def grouped_mm(x, w, offsets, kernel="auto", gather_idx=None, scatter_idx=None, out_rows=None):
    """x: (Nx, K); w: (E, N, K); offsets: (E+1,) int, offsets[0] = 0, offsets[-1] <= M rows; gather_idx /
    scatter_idx: (M,) int64 or None (identity; the triton path fuses them into its loads and stores, the others copy);
    returns (out_rows or M, N), zero in rows nothing was scattered to. Differentiable in x and w."""
    kernel = pick(kernel, x, w)
    if kernel == "grouped_mm":
        if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
            raise ValueError(f"moe_kernel='grouped_mm' takes bfloat16 only (got {x.dtype}); use dtype=bfloat16 or "
                             "moe_kernel='auto'")
        xs = x if gather_idx is None else x.index_select(0, gather_idx)  # copies, unlike triton's fused loads
        y = _torch_grouped_mm(xs, w, offsets)
        return y if scatter_idx is None else y.new_zeros(out_rows, y.shape[1]).index_copy(0, scatter_idx, y)
    if kernel == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("moe_kernel='triton' needs a CUDA GPU (or TRITON_INTERPRET=1, slowly, on the CPU)")
        from gemm_kernels.triton_gemm import scatter2scatter  # imported only here: CPU machines never touch Triton
        return scatter2scatter(x, w, offsets, gather_idx, scatter_idx, out_rows)
    if kernel == "loop":
        return _grouped_mm_loop(x, w, offsets, gather_idx, scatter_idx, out_rows)
    raise ValueError(f"moe_kernel must be one of {KERNELS}, got {kernel!r}")


def _torch_grouped_mm(x, w, offsets):
    # torch._grouped_mm wants the second operand column-major per expert, which w.mT of an (E, N, K) w is. It leaves
    # the rows past the last group undefined, forward and backward: torch.where zeroes them both ways
    valid = (torch.arange(x.shape[0], device=x.device) < offsets[-1]).unsqueeze(1)
    y = torch._grouped_mm(torch.where(valid, x, 0), w.mT, offs=offsets[1:].to(torch.int32))
    return torch.where(valid, y, 0)


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
        y = xs.new_zeros(xs.shape[0], w.shape[1])  # zeros: rows past the last group stay zero
        for e, (a, b) in enumerate(zip(bounds, bounds[1:])):
            torch.mm(xs[a:b], w[e].t(), out=y[a:b])
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, w = ctx.saved_tensors
        dxs, dw = torch.zeros_like(xs), torch.empty_like(w)
        for e, (a, b) in enumerate(zip(ctx.bounds, ctx.bounds[1:])):
            torch.mm(dy[a:b], w[e], out=dxs[a:b])
            torch.mm(dy[a:b].t(), xs[a:b], out=dw[e])  # an empty slice gives zeros
        return dxs, dw, None
