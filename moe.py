"""
Mixture-of-Experts: a router picks top_k of n_expert SwiGLU MLPs for each token, and only those run.

In forward order: route (fp32 scores, top_k, optional renormalisation and DeepSeek-V3's balancing bias), dispatch
(the token-expert pairs sorted by expert once, capacity applied if set), three grouped GEMMs over that order
(kernels/), and combine (each pair's output weighted by its score, summed per token, shared experts added). The
balancing losses (Switch's aux loss, ST-MoE's router z-loss) reach train.py through GPT.moe_loss(); routing metrics
are counted on the device and read only at log time. The README's MoE section has the formulas.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import grouped_mm


def local(t):
    """The rank's own part of a parameter that tensor parallelism turned into a DTensor (parallel.py)."""
    return t.to_local() if hasattr(t, "to_local") else t


def active_params(module):
    """Parameters of `module` that one token uses: of each MoE layer's routed experts, only top_k."""
    idle = sum((m.n_expert - m.top_k) * (m.w1[0].numel() + m.w3[0].numel() + m.w2[0].numel())
               for m in module.modules() if isinstance(m, MoE))
    return sum(p.numel() for p in module.parameters()) - idle


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
        self.shared = None  # experts every token goes through: a dense MLP that model.Block puts here
        self.dropout = nn.Dropout(config.dropout)
        # aux-loss-free balancing: added to the scores when choosing experts (saved in checkpoints)
        self.register_buffer("expert_bias", torch.zeros(E), persistent=config.moe_balance == "bias")
        self.use_bias = config.moe_balance == "bias"
        # pairs routed to each expert since the last bias update / metrics read; pairs dropped for capacity
        self.register_buffer("load", torch.zeros(E), persistent=False)
        self.register_buffer("load_seen", torch.zeros(E), persistent=False)
        self.register_buffer("dropped", torch.zeros(2), persistent=False)  # (dropped pairs, routed pairs)
        self.aux_loss = None  # the balancing losses of the last forward, for GPT.moe_loss()
        # tensor parallelism (parallel.py) makes these Megatron's f and g: each rank then holds a slice of every
        # expert's hidden units, so the experts' input gradient and their outputs are summed over the group
        self.enter_experts, self.leave_experts = nn.Identity(), nn.Identity()
        # expert parallelism (parallel.ExpertsEP): this rank holds n_expert/ep_size of the experts, and the sorted
        # rows travel to the ranks holding theirs and back: expert_parallel(x_sorted, counts, self.experts)
        self.expert_parallel = None

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
        if self.expert_parallel is not None:
            y = self.expert_parallel(x.index_select(0, token), offsets.diff(), self.experts)
            y = y.new_zeros(expert.numel(), d).index_copy(0, order, y)  # (N*k, d), zero where dropped
        else:
            w1, w3, w2 = local(self.w1), local(self.w3), local(self.w2)
            xe = self.enter_experts(x)
            if torch.is_autocast_enabled(x.device.type):  # the grouped GEMMs are not autocast ops: cast by hand
                dt = torch.get_autocast_dtype(x.device.type)
                xe, w1, w3, w2 = xe.to(dt), w1.to(dt), w3.to(dt), w2.to(dt)
            if not xe.is_cuda:  # one gather for both up-projections (on CUDA the kernel gathers rows as it loads)
                xe, token = xe.index_select(0, token), None
            h = F.silu(grouped_mm(xe, w1, offsets, gather_idx=token)) * grouped_mm(xe, w3, offsets, gather_idx=token)
            y = grouped_mm(h, w2, offsets, scatter_idx=order, out_rows=expert.numel())  # zero where dropped
        y = self.leave_experts(y)
        out = self.dropout(torch.bmm(weight.to(y.dtype).unsqueeze(1), y.view(B * T, self.top_k, d)).view(B, T, d))
        if self.shared is not None:
            out = out + self.shared(x.view(B, T, d))
        return out

    def experts(self, x, counts):
        """The SwiGLU experts on rows sorted by expert, counts[e] of them for expert e (under expert parallelism,
        this rank's experts on the rows its group sent them)."""
        offsets = F.pad(counts.cumsum(0), (1, 0))
        w1, w3, w2 = local(self.w1), local(self.w3), local(self.w2)
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, w1, w3, w2 = x.to(dt), w1.to(dt), w3.to(dt), w2.to(dt)
        return grouped_mm(F.silu(grouped_mm(x, w1, offsets)) * grouped_mm(x, w3, offsets), w2, offsets)

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


def describe(metrics, aux_loss):
    """The log line for the MoE layers' metrics() since the last one; the worst layer is the one to watch."""
    return (f"moe: balance {min(m['balance'] for m in metrics):.3f} (worst layer), entropy "
            f"{min(m['entropy_bits'] for m in metrics):.2f} bits, dropped {max(m['dropped'] for m in metrics):.1%}, "
            f"aux loss {aux_loss:.4f}")
