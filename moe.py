"""
Mixture-of-Experts: a router picks top_k of n_expert SwiGLU MLPs for each token, and only those run.

The layer, in forward order:
1. Router. A linear gate scored in fp32 (softmax, or sigmoid as in DeepSeek-V3); top_k experts per token, their scores
   renormalised to sum to one (optional). With moe_balance='bias' a per-expert bias is added to the scores for the
   choice only, never to the weights, and train.py nudges it after each step toward equal load (aux-loss-free
   balancing, DeepSeek-V3 section 2.1.2).
2. Dispatch. The N*top_k (token, expert) pairs are sorted by expert once. Each expert's tokens are then a contiguous
   slice, and the experts' three matmuls are three grouped GEMMs over that order (kernels/): on a GPU one Triton launch
   each, with the gather of token rows and the scatter of results fused into the matmul; no Python loop over experts.
3. Capacity (optional). Dropless by default. With capacity_factor > 0 each expert takes at most
   ceil(N*top_k*capacity_factor/E) tokens, keeping those it scored highest; a dropped pair contributes nothing, so a
   token dropped by all its experts passes through the block on the residual stream alone.
4. Combine. Each pair's output is weighted by its router score and summed per token; shared experts, when configured,
   see every token and are added on top.

Balancing losses, returned through GPT.moe_loss() for train.py to add to the language-model loss:
- Switch Transformer's auxiliary loss aux_loss_coef * E * sum_i f_i * P_i, where f_i is the fraction of routed pairs
  that chose expert i and P_i the mean router probability of expert i; it is aux_loss_coef at perfect balance.
- ST-MoE's router z-loss z_loss_coef * mean(logsumexp(logits)^2), on the logits (not the probabilities), which keeps
  them small enough for the fp32 softmax to stay accurate.

Metrics (GPT.moe_metrics()) are counted on the device without host syncs and read only at log time.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kernels import grouped_mm


def local(t):
    """The rank's own part of a parameter that tensor parallelism turned into a DTensor (parallel.py)."""
    return t.to_local() if hasattr(t, "to_local") else t


class EnterTP(torch.autograd.Function):
    """Megatron's f: identity forward; backward sums the input's gradient over the tensor-parallel group, whose ranks
    each hold a slice of every expert's hidden units and so each contribute part of it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class LeaveTP(torch.autograd.Function):
    """Megatron's g: sums the ranks' partial expert outputs; the gradient of a sum reaches each part unchanged."""

    @staticmethod
    def forward(ctx, y, group):
        y = y.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        E, d, h = config.n_expert, config.n_embd, config.expert_hidden
        self.n_expert, self.top_k = E, config.top_k
        self.score, self.renormalize = config.router_score, config.router_renormalize
        self.capacity_factor = config.capacity_factor
        self.aux_loss_coef, self.z_loss_coef = config.aux_loss_coef, config.z_loss_coef
        self.router = nn.Linear(d, E, bias=False)
        # stacked expert weights, laid out (in, out) so that each expert is x @ w[e]
        self.w1 = nn.Parameter(torch.empty(E, d, h))  # gate
        self.w3 = nn.Parameter(torch.empty(E, d, h))  # up
        self.w2 = nn.Parameter(torch.empty(E, h, d))  # down, feeds the residual stream (GPT rescales its init)
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, mean=0.0, std=0.02)
        self.shared = None
        if config.n_shared_expert:
            from model import MLP  # the dense SwiGLU, config.n_shared_expert experts wide
            self.shared = MLP(config, hidden=config.n_shared_expert * h)
        self.dropout = nn.Dropout(config.dropout)
        # aux-loss-free balancing: added to the scores when choosing experts (saved in checkpoints)
        self.register_buffer("expert_bias", torch.zeros(E), persistent=config.moe_balance == "bias")
        self.use_bias = config.moe_balance == "bias"
        # pairs routed to each expert since the last bias update / metrics read; pairs dropped for capacity
        self.register_buffer("load", torch.zeros(E), persistent=False)
        self.register_buffer("load_seen", torch.zeros(E), persistent=False)
        self.register_buffer("dropped", torch.zeros(2), persistent=False)  # (dropped pairs, routed pairs)
        self.aux_loss = None  # the balancing losses of the last forward, for GPT.moe_loss()
        self.tp_group = None  # set by parallel.py under tensor parallelism

    def route(self, x):
        """x: (N, d) -> expert ids (N, k), combine weights (N, k) fp32, and the balancing loss."""
        logits = F.linear(x.float(), local(self.router.weight).float())  # fp32 even under autocast
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if self.use_bias else scores
        expert = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weight = scores.gather(1, expert)
        if self.renormalize:
            weight = weight / weight.sum(-1, keepdim=True)
        loss = logits.new_zeros(())
        if self.training and self.aux_loss_coef:
            counts = torch.bincount(expert.flatten(), minlength=self.n_expert)
            f = counts.float() / expert.numel()
            P = (scores / scores.sum(-1, keepdim=True)).mean(0)  # = softmax probabilities when score='softmax'
            loss = loss + self.aux_loss_coef * self.n_expert * (f * P).sum()
        if self.training and self.z_loss_coef:
            loss = loss + self.z_loss_coef * torch.logsumexp(logits, -1).pow(2).mean()
        return expert, weight, loss

    def dispatch(self, expert, weight):
        """The (token, slot) pairs sorted by expert, minus those over capacity: their flat pair ids (N*k) and each
        expert's offsets into that order (E+1,)."""
        E, flat = self.n_expert, expert.flatten()
        if self.capacity_factor > 0:
            # sort by score (best first), then stably by expert: each expert's pairs come out best first
            by_score = weight.flatten().argsort(descending=True, stable=True)
            order = by_score[flat[by_score].argsort(stable=True)]
        else:
            order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E)
        offsets = F.pad(counts.cumsum(0), (1, 0))
        if self.training:  # the load the router asked for, before any dropping
            self.load_seen += counts
            if self.use_bias:
                self.load += counts
        if self.capacity_factor > 0:
            capacity = math.ceil(flat.numel() * self.capacity_factor / E)
            rank_in_expert = torch.arange(flat.numel(), device=flat.device) - offsets[flat[order]]
            order = order[rank_in_expert < capacity]
            kept = counts.clamp(max=capacity)
            if self.training:
                self.dropped += torch.stack([counts.sum() - kept.sum(), counts.sum()])
            counts, offsets = kept, F.pad(kept.cumsum(0), (1, 0))
        elif self.training:
            self.dropped[1] += flat.numel()
        return order, offsets

    def forward(self, x):
        B, T, d = x.shape
        x = x.reshape(B * T, d)
        expert, weight, self.aux_loss = self.route(x)
        order, offsets = self.dispatch(expert, weight)
        token = order // self.top_k
        w1, w3, w2 = local(self.w1), local(self.w3), local(self.w2)
        xe = x if self.tp_group is None else EnterTP.apply(x, self.tp_group)
        if torch.is_autocast_enabled(x.device.type):  # the grouped GEMMs are not autocast ops: cast by hand
            dt = torch.get_autocast_dtype(x.device.type)
            xe, w1, w3, w2 = xe.to(dt), w1.to(dt), w3.to(dt), w2.to(dt)
        if not xe.is_cuda:  # one gather for both up-projections (on CUDA the kernel gathers rows as it loads them)
            xe, token = xe.index_select(0, token), None
        h = F.silu(grouped_mm(xe, w1, offsets, gather_idx=token)) * grouped_mm(xe, w3, offsets, gather_idx=token)
        y = grouped_mm(h, w2, offsets, scatter_idx=order, out_rows=expert.numel())  # (N*k, d), zero where dropped
        if self.tp_group is not None:
            y = LeaveTP.apply(y, self.tp_group)
        out = self.dropout(torch.bmm(weight.to(y.dtype).unsqueeze(1), y.view(B * T, self.top_k, d)).view(B, T, d))
        if self.shared is not None:
            out = out + self.shared(x.view(B, T, d))
        return out

    @torch.no_grad()
    def update_bias(self, rate):
        """Aux-loss-free balancing: raise the bias of underloaded experts and lower that of overloaded ones by
        `rate`, using the load routed since the last call (summed over ranks under torch.distributed)."""
        load = self.load.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.expert_bias += rate * torch.sign(load.mean() - load)
        self.load.zero_()

    @torch.no_grad()
    def metrics(self):
        """Routing statistics since the last call, then reset: tokens per expert, load-balance factor (mean load
        / max load, 1 is perfect), entropy of the load distribution in bits (log2 E is perfect), dropped fraction."""
        load = self.load_seen.clone()
        share = load / load.sum().clamp(min=1)
        entropy = -(share * share.clamp(min=1e-12).log2()).sum()
        out = {"tokens_per_expert": load.long().tolist(),
               "balance": (load.mean() / load.max().clamp(min=1)).item(),
               "entropy_bits": entropy.item(),
               "dropped": (self.dropped[0] / self.dropped[1].clamp(min=1)).item()}
        self.load_seen.zero_()
        self.dropped.zero_()
        return out
