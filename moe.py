"""
Mixture-of-Experts: a router picks top_k of n_expert SwiGLU MLPs for each token, and only those run.

In forward order: route (fp32 scores, top_k, DeepSeek-V3's optional balancing bias), sort the token-expert pairs by
expert (capacity applied if set), the experts on those sorted rows (two grouped GEMMs, gemm_kernels/), and combine
(each pair's output weighted by its score, summed per token, shared experts added). Every shape depends on the batch
alone, never on the routing, and nothing waits for the host: a dropped pair stays in the sorted order, past the
kept ones, and comes back zero. The balancing losses (Switch's aux loss, ST-MoE's router z-loss) reach train.py
through GPT.moe_loss(); routing metrics are counted on the device and read only at log time. docs/moe.md has the
formulas. The gradient-checkpoint helper is here because MoE layers read its rerun flag (to count routing once).
Expert parallelism is here too (apply_expert_parallel, ExpertsEP, sync_expert_grads): it is the experts' own
layout, which parallel.parallelize applies before the others.
"""

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from gemm_kernels import grouped_mm


def local(t):
    """The rank's own part of a parameter that tensor parallelism turned into a DTensor (parallel.py)."""
    return t.to_local() if hasattr(t, "to_local") else t


def active_params(module):
    """Parameters of `module` that one token uses: of each MoE layer's routed experts, only top_k."""
    idle = sum((m.n_expert - m.top_k) * (m.w13[0].numel() + m.w2[0].numel())
               for m in module.modules() if isinstance(m, MoE))
    return sum(p.numel() for p in module.parameters()) - idle


_recomputing = False  # True while gradient checkpointing reruns a forward in backward


@contextlib.contextmanager
def _recompute():
    global _recomputing
    _recomputing = True
    try:
        yield
    finally:
        _recomputing = False


def _contexts():  # (around the forward, around its rerun); a module-level function, as torch.compile needs
    return contextlib.nullcontext(), _recompute()


def checkpoint(fn, *args):
    """torch.utils.checkpoint (non-reentrant) that flags its rerun in backward, so that MoE layers count their routing
    once per real forward (the rerun routes the same tokens again)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        E, d, h = config.n_expert, config.n_embd, config.expert_hidden
        self.n_expert, self.top_k = E, config.top_k
        self.score, self.renormalize = config.router_score, config.router_renormalize
        self.capacity_factor, self.eval_capacity_factor = config.capacity_factor, config.eval_capacity_factor
        self.kernel = config.moe_kernel
        self.aux_loss_coef, self.z_loss_coef = config.aux_loss_coef, config.z_loss_coef
        self.router = nn.Linear(d, E, bias=False)
        # stacked expert weights, each (out, in) as nn.Linear keeps its weight: expert e computes x @ w[e].T. Gate
        # (w13[:, 0], Mixtral's w1) and up (w13[:, 1], its w3) are one parameter, one GEMM that reads each row once,
        # with nothing concatenated per forward; tensor parallelism splits dim 2, each rank's gate and up together
        gate, up = torch.empty(E, h, d).normal_(0.0, 0.02), torch.empty(E, h, d).normal_(0.0, 0.02)
        self.w13 = nn.Parameter(torch.stack([gate, up], dim=1))  # (E, 2, h, d)
        # down, feeds the residual stream (GPT rescales its init)
        self.w2 = nn.Parameter(torch.empty(E, d, h).normal_(0.0, 0.02))
        self.register_load_state_dict_pre_hook(_join_gate_up)  # checkpoints saved with w1 and w3
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
        # expert parallelism (ExpertsEP below): this rank holds n_expert/ep_size of the experts, and the sorted
        # rows travel to the ranks holding theirs and back: expert_parallel(x_sorted, counts, self.experts)
        self.expert_parallel = None
        self.load_group = None  # the ranks whose loads update_bias sums: all, or under pipeline parallelism a stage's

    def route(self, x):
        """x: (N, d) -> expert ids (N, k), combine weights (N, k) fp32, the router scores of those choices (N, k),
        and the balancing loss."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 even under autocast, which would make it bf16
            logits = F.linear(x.float(), local(self.router.weight).float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if self.use_bias else scores
        expert = choice.topk(self.top_k, dim=-1, sorted=False).indices
        score = scores.gather(1, expert)
        # at top_k=1 a renormalised weight is always 1 and the LM loss would not reach the router: Switch keeps p
        weight = score / score.sum(-1, keepdim=True) if self.renormalize and self.top_k > 1 else score
        loss = logits.new_zeros(())
        if self.training and self.aux_loss_coef:
            f = self.count(expert).float() / expert.numel()
            P = (scores / scores.sum(-1, keepdim=True)).mean(0)  # = softmax probabilities when score='softmax'
            loss = loss + self.aux_loss_coef * self.n_expert * (f * P).sum()
        if self.training and self.z_loss_coef:
            loss = loss + self.z_loss_coef * torch.logsumexp(logits, -1).pow(2).mean()
        return expert, weight, score, loss

    def count(self, expert):
        """Pairs per expert (E,) int64; a scatter, not torch.bincount, which waits for the host on CUDA."""
        flat = expert.flatten()
        counts = torch.zeros(self.n_expert, dtype=torch.long, device=flat.device)
        return counts.scatter_add_(0, flat, torch.ones_like(flat))

    def sort_by_expert(self, expert, score):
        """The (token, slot) pairs as flat ids (N*k,) sorted by expert, and the pairs each expert takes (E,). Over
        capacity an expert takes the pairs with the highest router scores; the rest go last, in no group."""
        E, flat = self.n_expert, expert.flatten()
        counts = self.count(expert)
        if self.training and not _recomputing:  # the load the router asked for, before any dropping
            self.load_seen += counts
            if self.use_bias:
                self.load += counts
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor <= 0:
            if self.training and not _recomputing:
                self.dropped[1] += flat.numel()
            return flat.argsort(stable=True), counts
        capacity = math.ceil(flat.numel() * factor / E)
        # best score first, then stably by expert: each expert's pairs come out best first
        by_score = score.flatten().argsort(descending=True, stable=True)
        order = by_score[flat[by_score].argsort(stable=True)]
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[flat[order]]
        # the kept pairs keep their places; the dropped ones move, stably, behind every group
        order = order[torch.where(rank_in_expert < capacity, flat[order], E).argsort(stable=True)]
        kept = counts.clamp(max=capacity)
        if self.training and not _recomputing:
            self.dropped += torch.stack([counts.sum() - kept.sum(), counts.sum()])
        return order, kept

    def experts(self, x, counts, gather=None, scatter=None, out_rows=None):
        """The routed experts on expert-sorted rows x[gather[i]] (gather None: x itself): counts[e] rows for expert
        e, in expert order, then any rows of dropped pairs, which come back zero; row i's result goes to row
        scatter[i] of out_rows (scatter None: row i). The triton path fuses the gather and the scatter into its
        loads and stores (no sorted copy of the rows); the others copy. Expert parallelism exchanges rows around
        this."""
        w13, w2 = local(self.w13).flatten(1, 2), local(self.w2)  # (E, 2h, d): a view, gate rows then up rows
        if torch.is_autocast_enabled(x.device.type):  # the grouped GEMMs are not autocast ops: cast by hand (a
            dt = torch.get_autocast_dtype(x.device.type)  # no-op where the weights are already in it, as FSDP's
            x, w13, w2 = x.to(dt), w13.to(dt), w2.to(dt)  # mixed precision keeps them on a GPU)
        offsets = F.pad(counts.cumsum(0), (1, 0))
        gate, up = grouped_mm(x, w13, offsets, self.kernel, gather_idx=gather).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, w2, offsets, self.kernel, scatter_idx=scatter, out_rows=out_rows)

    def forward(self, x):
        B, T, d = x.shape
        x = x.reshape(B * T, d)
        expert, weight, score, aux_loss = self.route(x)
        if not _recomputing:  # the rerun's loss, kept, would keep its graph and every activation the rerun saved
            self.aux_loss = aux_loss
        order, counts = self.sort_by_expert(expert, score)
        if self.expert_parallel is None:  # rows in (token, slot) order, dropped pairs zero
            ys = self.experts(self.enter_experts(x), counts, order // self.top_k, order, order.numel())
            y = self.leave_experts(ys)
        else:  # ExpertsEP: the sorted rows go to the ranks holding their experts and come back
            ys = self.expert_parallel(x.index_select(0, order // self.top_k), counts, self.experts)
            y = torch.zeros_like(ys).index_copy(0, order, ys)
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
            torch.distributed.all_reduce(load, group=self.load_group)
        self.expert_bias += rate * torch.sign(load.mean() - load)
        self.load.zero_()

    def metrics(self):
        """This layer's read_metrics."""
        return read_metrics([self])[0][0]


# -----------------------------------------------------------------------------
# expert parallelism: each rank holds some of every layer's experts (parallel.py applies the other layouts)

def apply_expert_parallel(model, ep_size, device_type):
    """Expert parallelism on an (expert_dp, ep) mesh of the world: in each group of ep_size consecutive ranks, rank
    r keeps experts [r*E/ep_size, (r+1)*E/ep_size) of every MoE layer, as DTensors sharded over the group and
    replicated across groups, so that a distributed checkpoint holds each expert once and loads on any layout.
    Returns {name: parameter} of the experts, which the data-parallel layouts must leave alone."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    world = dist.get_world_size()
    mesh = init_device_mesh(device_type, (world // ep_size, ep_size), mesh_dim_names=("expert_dp", "ep"))
    rank, experts = mesh["ep"].get_local_rank(), {}
    for name, moe in model.named_modules():
        if isinstance(moe, MoE):
            for w in ("w13", "w2"):
                full = getattr(moe, w).data  # the same seeded initial weights on every rank
                n = full.shape[0] // ep_size
                mine = DTensor.from_local(full[rank * n:(rank + 1) * n].clone(), mesh, [Replicate(), Shard(0)],
                                          run_check=False)
                setattr(moe, w, nn.Parameter(mine))
                experts[f"{name}.{w}"] = getattr(moe, w)
            moe.expert_parallel = ExpertsEP(mesh)
    return experts


class ExpertsEP(nn.Module):
    """How moe.MoE runs its experts under expert parallelism. Its rows arrive sorted by expert, counts[e] for
    expert e; those of the experts rank j holds are a contiguous run, sent to rank j by one all_to_all with uneven
    splits, run there, and returned by a second all_to_all into the same order. Both are differentiable: backward
    sends each row's gradient back the way it came, so every rank's experts get the gradients of all the rows
    they ran (and sync_expert_grads averages those over the groups)."""

    def __init__(self, mesh):
        super().__init__()
        self.group, self.size = mesh["ep"].get_group(), mesh["ep"].size()

    # eager under torch.compile: the split sizes are data (a graph break anyway), and the experts' DTensor weights
    # reach the compiled kernels as DTensors otherwise
    @torch.compiler.disable
    def forward(self, x, counts, experts):
        from torch.distributed._functional_collectives import all_to_all_single_autograd
        P, rows = self.size, x.shape[0]
        # first a small exchange: got[i, e] = how many rows rank i sends to this rank's e-th expert (a host sync,
        # since the split sizes are Python ints)
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=self.group)
        got = got.view(P, -1)
        send, recv = torch.stack([counts.view(P, -1).sum(1), got.sum(1)]).tolist()  # (one read of both)
        x = x[:sum(send)]  # the rows of pairs dropped by capacity come last and stay here (their output is zero)
        if torch.is_autocast_enabled(x.device.type):  # the experts compute in it: send half the bytes
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = all_to_all_single_autograd(x, recv, send, self.group)
        # the rows arrive by source rank, each source's by expert: regroup them by expert for the grouped GEMMs
        expert = torch.arange(got.shape[1], device=x.device).repeat(P)  # of each (source, expert) run of rows
        order = expert.repeat_interleave(got.flatten(), output_size=sum(recv)).argsort(stable=True)
        y = experts(x, got.sum(0), order, order, x.shape[0])  # and back in arrival order
        y = all_to_all_single_autograd(y, send, recv, self.group)
        return torch.cat([y, y.new_zeros(rows - y.shape[0], y.shape[1])])


def sync_expert_grads(model):
    """Expert parallelism, after backward: each expert's gradient summed over the ranks holding a copy of it (one
    per ep group), then divided by the world size, the mean over the global batch that DDP and FSDP take of every
    other gradient. (Each copy already holds its own group's rows, through the all_to_all's backward.) One
    all-reduce over a flat buffer of every layer's expert gradients per group (and dtype), not one per weight."""
    buckets = {}
    for moe in model.modules():
        if isinstance(moe, MoE) and moe.expert_parallel is not None:
            for w in (moe.w13, moe.w2):
                if w.grad is not None:
                    grad = w.grad.to_local()
                    buckets.setdefault((w.device_mesh.get_group("expert_dp"), grad.dtype), []).append(grad)
    for (group, _), grads in buckets.items():
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(dist.get_world_size())
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


@torch.no_grad()
def read_metrics(layers, *scalars):
    """The routing statistics of MoE `layers` since the last read, then reset, as a dict per layer: tokens per
    expert, load-balance factor (mean load / max load, 1 is perfect), entropy of the load distribution in bits
    (log2 E is perfect), dropped fraction; and the values of the 0-dim tensors `scalars`. All in one transfer from
    the device, one host sync at a log line however many layers: ([dict per layer], [float per scalar])."""
    parts = [t.float().flatten() for m in layers for t in (m.load_seen, m.dropped)]
    parts += [s.float().view(1) for s in scalars]
    if not parts:
        return [], []
    values = torch.cat(parts).tolist()
    out = []
    for m in layers:
        E = m.load_seen.numel()
        load, (dropped, routed), values = values[:E], values[E:E + 2], values[E + 2:]
        share = [n / max(sum(load), 1) for n in load]
        out.append({"tokens_per_expert": [int(n) for n in load],
                    "balance": sum(load) / E / max(max(load), 1),
                    "entropy_bits": -sum(p * math.log2(p) for p in share if p > 0),
                    "dropped": dropped / max(routed, 1)})
        m.load_seen.zero_()
        m.dropped.zero_()
    return out, values


def _join_gate_up(module, state_dict, prefix, *args):
    """Checkpoints saved before gate and up became one parameter hold them as w1 and w3: joined here on load."""
    if prefix + "w1" in state_dict and prefix + "w13" not in state_dict:
        state_dict[prefix + "w13"] = torch.stack([state_dict.pop(prefix + "w1"), state_dict.pop(prefix + "w3")], 1)


def describe(metrics, aux_loss):
    """The log line for the MoE layers' metrics() since the last one; the worst layer is the one to watch."""
    return (f"moe: balance {min(m['balance'] for m in metrics):.3f} (worst layer), entropy "
            f"{min(m['entropy_bits'] for m in metrics):.2f} bits, dropped {max(m['dropped'] for m in metrics):.1%}, "
            f"aux loss {aux_loss:.4f}")
