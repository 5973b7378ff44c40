"""
Muon (Keller Jordan, 2024), the optimizer GPT.configure_optimizers gives the blocks' matrices with optimizer='muon':
momentum orthogonalised by a Newton-Schulz iteration, batched over the matrices of one shape. tests/test_model.py
checks it against the published algorithm in float64 and against torch.optim.Muon.
"""

import math

import torch


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024): momentum orthogonalised by a Newton-Schulz iteration, and decoupled weight decay.
    The arguments, update and state of torch.optim.Muon, faster: the matrices of one shape (a tall one as its
    transpose) are orthogonalised together, in one batched Newton-Schulz, as modded-nanogpt does, rather than one at
    a time. adjust_lr_fn='match_rms_adamw' (Liu et al., 2025) gives the update AdamW's RMS: they share one lr."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn="match_rms_adamw"):
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn))
        if any(p.dim() != 2 for g in self.param_groups for p in g["params"]):
            raise ValueError("Muon takes 2-D matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            mu, lr = group["momentum"], group["lr"]
            torch._foreach_lerp_(bufs, [p.grad for p in params], 1 - mu)  # b = mu*b + (1-mu)*g
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            batches = {}  # (short side, long side, device) -> [(matrix, its momentum)]
            for p, b in zip(params, bufs):
                batches.setdefault((*sorted(p.shape), p.device), []).append((p, b))
            for (rows, cols, device), batch in batches.items():
                X = torch.empty(len(batch), rows, cols, dtype=torch.bfloat16, device=device)  # the updates, wide
                for (p, b), x in zip(batch, X):  # written straight into the batch, a tall one transposed
                    x = x.mT if p.size(0) > p.size(1) else x
                    torch.lerp(p.grad, b, mu, out=x) if group["nesterov"] else x.copy_(b)
                X = newton_schulz(X, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for (p, _), x in zip(batch, X):  # torch.optim.Muon's lr adjustments (None is 'original')
                    scale = 0.2 * math.sqrt(max(p.shape)) if group["adjust_lr_fn"] == "match_rms_adamw" else \
                        math.sqrt(max(1, p.size(0) / p.size(1)))
                    p.add_(x.mT if p.size(0) > p.size(1) else x, alpha=-lr * scale)
        return loss


def newton_schulz(G, coefficients, steps, eps):
    """~U V^T of each U S V^T in G (N, rows, cols), rows <= cols (the Gram matrix is rows x rows): Keller Jordan's
    quintic iteration in bfloat16, whose singular values end near one, not at it (which trains as well)."""
    a, b, c = coefficients
    X = G.bfloat16()
    X = X / X.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # Frobenius >= spectral norm: singular values <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # (a + b A + c A^2) X
    return X
