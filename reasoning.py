"""
The Dynamic Reasoning Engine (DRE): a recurrent-depth transformer that gives each token as many passes through a
shared core as it needs (after Geiping et al. 2025):

    e   = prelude(embed(tokens))      the first n_prelude blocks of transformer.h, run once
    s_0 = e,  s_i = core(s_{i-1})     the middle blocks, run r times (dre_inject: s_i = e + core(s_{i-1}) - s_{i-1})
    out = head(coda(s_r))             the last n_coda blocks, run once

At r = 1 it is exactly the plain GPT of the same blocks, and it has that model's parameters (with or without
injection). Training draws r per optimizer step and backpropagates through the last dre_backprop_steps; at inference
a token stops once its exit test falls below dre_threshold: 'kl', how far its next-token distribution moved (runs the
coda and head every step), or 'state', how far its state moved, |s_i - s_{i-1}| / |s_i| (O(n_embd) a step).

The recipe, for running more steps than training did (Bansal et al. 2022): r drawn per step, so that every depth has
to predict and extra steps must leave a settled answer alone; a curriculum by stages (depth 1, then deeper, each
stage starting from the last one's weights); no coda, so that the head reads the core's state and every hop is the
core's to take (with a coda block the model stopped at half of depth 2); full backpropagation through the steps
(truncating it to the last 2 lost depth 2; Bansal's progressive loss, dre_progressive, learnt depths 3-4 more slowly
and bought nothing beyond them); no input injection
(dre_inject keeps the state at its trained size, but on pointer chasing it kept the depth-1 lookup from forming).
So trained, the DRE follows chains deeper than one pass of its blocks can, by running more steps; the README's
reasoning-benchmark section gives the figures. The end of this file is that benchmark's evaluation.
"""

import functools
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import MoE, active_params, checkpoint


@functools.lru_cache(maxsize=16)  # drawn from at every training step; the tensor is never modified
def step_distribution(mean, max_steps, sigma=0.5, points=1000):
    """P(r = 1), ..., P(r = max_steps) for r = 1 + Poisson(lambda), lambda log-normal with mean `mean` - 1 and log-std
    sigma, the tail beyond max_steps folded onto max_steps (computed on `points` quantiles of the log-normal)."""
    probs = torch.zeros(max_steps, dtype=torch.float64)
    if mean <= 1:
        probs[0] = 1.0
        return probs
    z = torch.special.ndtri((torch.arange(points, dtype=torch.float64) + 0.5) / points)
    lam = (mean - 1) * torch.exp(sigma * z - sigma ** 2 / 2)
    n = torch.arange(max_steps - 1, dtype=torch.float64)[:, None]  # Poisson outcomes 0 .. max_steps-2
    probs[:-1] = torch.exp(n * lam.log() - lam - torch.lgamma(n + 1)).mean(1)
    probs[-1] = (1 - probs[:-1].sum()).clamp(min=0)
    return probs


def ranks(x):
    """Ranks 0..n-1 of x (1-D), tied values sharing the mean of their ranks."""
    xs = x.sort().values  # a run of ties spans sorted places [first, end): its mean rank is (first + end - 1) / 2
    return (torch.searchsorted(xs, x) + torch.searchsorted(xs, x, right=True) - 1).double() / 2


def spearman(x, y):
    """Spearman's rank correlation of two 1-D tensors (Pearson's on tie-averaged ranks); nan if either is constant."""
    rx, ry = (r - r.mean() for r in (ranks(x), ranks(y)))
    denom = (rx.pow(2).sum() * ry.pow(2).sum()).sqrt()
    return (rx * ry).sum().item() / denom.item() if denom > 0 else float("nan")


class StepCache:
    """Keys and values of one block for generation, one copy per core step: (steps, B, length, heads, head_dim).
    Outside the core there is one step, and update() makes it a plain KV cache (as model.KVCache)."""

    def __init__(self, length, steps):
        self.length, self.steps, self.pos, self.k, self.v = length, steps, 0, None, None

    def update(self, k, v):
        k, v = StepKV(self).update(k, v)
        self.pos = k.size(1)  # the keys so far
        return k, v


class StepKV:
    """What a block's attention sees during one forward (passed where model.Block takes a cache). In the core, tokens
    still running contribute their new keys/values; tokens that exited keep serving those of their last step. A
    StepCache gets the chunk's keys/values in the current step's slot, and stays at pos until finish()."""

    def __init__(self, cache):
        self.cache, self.pos = cache, cache.pos if cache is not None else 0  # the attention reads pos: chunk start
        self.k = self.v = None  # (B, T, H, D): each token's keys/values from the last step it ran
        self.step, self.active = 0, None  # set by the core loop before each step (0-based slot, running tokens)

    def update(self, k, v):
        if self.active is not None:  # None while every token of the chunk is still running
            running = self.active[:, :, None, None]
            k, v = torch.where(running, k, self.k), torch.where(running, v, self.v)
        self.k, self.v = k, v
        c = self.cache
        if c is None:
            return k, v
        B, T, H, D = k.shape
        if c.k is None:
            c.k, c.v = (t.new_empty(c.steps, B, c.length, H, D) for t in (k, v))
        c.k[self.step, :, self.pos:self.pos + T] = k
        c.v[self.step, :, self.pos:self.pos + T] = v
        return c.k[self.step, :, :self.pos + T], c.v[self.step, :, :self.pos + T]

    def finish(self, steps_run):
        """The cache moves past the chunk; the slots of the steps no token of it ran get each token's last ones."""
        c, T = self.cache, self.k.size(1)
        if c is not None:
            c.k[steps_run:, :, self.pos:self.pos + T] = self.k
            c.v[steps_run:, :, self.pos:self.pos + T] = self.v
            c.pos = self.pos + T


class RecurrentDepth(nn.Module):
    """Runs transformer.h as prelude -> core x r -> coda. It has no parameters: the blocks stay in transformer.h
    (the core's once), so that parameter names, per-block sharding and MoE bookkeeping are those of a plain GPT."""

    def __init__(self, config, blocks):
        super().__init__()
        self.config = config  # shared with GPT; inference takes its own steps and threshold as arguments
        self.n_prelude, self.n_core = config.n_prelude, config.n_layer - config.n_prelude - config.n_coda
        # parameters one core step uses per token, for FLOP counts
        self.step_params = sum(active_params(b) for b in blocks[self.n_prelude:self.n_prelude + self.n_core])
        self.iteration = None  # the optimizer step r is drawn for (set by train.py); None: a fresh draw per forward
        self.sampled = []  # r of each training forward since pop_sampled()
        self.last_steps = None  # (B, T) core steps each token of the last forward ran
        self.last_r = None  # the same as an int when every token ran alike (known on the host: no read back)
        self.observed = []  # (steps, loss, mask) per observe() call since metrics()
        # FSDP (set by parallel.py): the ranks whose all-gathers in the loop (the coda's, for the exit test) must pair
        # up, so at inference every one of them runs as many core steps as the slowest, each its tokens' own number
        # of steps in effect. (The core's blocks are gathered once per forward, with the root's.)
        self.exit_group = None

    def train_distribution(self):
        if self.config.dre_sample_steps:
            return step_distribution(self.config.dre_mean_steps, self.config.max_reasoning_steps)
        return torch.eye(self.config.max_reasoning_steps, dtype=torch.float64)[-1]  # always max_reasoning_steps

    @torch.compiler.disable  # a host-side draw; a compiled model specialises on r (one graph per value)
    def sample_steps(self):
        if not self.config.dre_sample_steps:
            r = self.config.max_reasoning_steps
        elif self.iteration is None:
            r = int(torch.multinomial(self.train_distribution(), 1)) + 1
        else:  # a generator of its own, seeded by the step: the same draw on every rank and after a resume
            probs = self.train_distribution().tolist()
            r = random.Random(self.iteration).choices(range(1, len(probs) + 1), weights=probs)[0]
        self.sampled.append(r)
        return r

    def pop_sampled(self):
        sampled, self.sampled = self.sampled, []
        return sampled

    def expected_steps(self):
        """E[r] and E[min(r, dre_backprop_steps)] under the training distribution: forward and backward core steps."""
        probs = self.train_distribution()
        r = torch.arange(1, len(probs) + 1, dtype=torch.float64)
        return (probs * r).sum().item(), (probs * r.clamp(max=self.config.dre_backprop_steps)).sum().item()

    def core_flops_per_step(self, seq_len):
        """Forward FLOPs of one core step for one token: 2 per parameter, plus attention over seq_len keys."""
        return 2 * self.step_params + 4 * self.n_core * self.config.n_embd * seq_len

    def training_flops_per_token(self, active_params, seq_len):
        """model.flops_per_token for a DRE model: the blocks outside the core forward and backward once (6 per
        parameter, PaLM's 12*layers*width*T for attention), the core E[r] times forward and E[min(r, k)] backward."""
        fwd, bwd = self.expected_steps()
        d, outside = self.config.n_embd, self.config.n_layer - self.n_core
        attn = 12 * outside * d * seq_len + (4 * fwd + 8 * bwd) * self.n_core * d * seq_len
        return 6 * (active_params - self.step_params) + (2 * fwd + 4 * bwd) * self.step_params + attn

    def new_caches(self, length, steps=None):
        """One cache per block of transformer.h for generate(): a step per core step in the core (`steps`, the most
        a token will run; None: max_reasoning_steps), one outside it."""
        P, C, S = self.n_prelude, self.n_core, steps or self.config.max_reasoning_steps
        return [StepCache(length, S if P <= i < P + C else 1) for i in range(self.config.n_layer)]

    def run(self, blocks, x, cos, sin, caches=None):
        for block, cache in zip(blocks, caches or [None] * len(blocks)):
            if self.config.grad_checkpoint and self.training and cache is None:
                x = checkpoint(block, x, cos, sin)
            else:
                x = block(x, cos, sin, cache)
        return x

    def forward(self, x, blocks, cos, sin, caches=None, steps=None, head=None, threshold=None):
        """x: the embedded tokens (B, T, d) -> the coda's output. steps: None draws r in training and decides per
        token by dre_threshold at inference (up to max_reasoning_steps); an int runs every token that many core
        steps; a (B, T) tensor gives each token its own count. threshold (inference): each token stops by this
        exit threshold instead, after at most `steps`; None: dre_threshold if steps is None, else no exit.
        caches: from new_caches(), for generation. head: the coda's output -> logits, which the exit test compares
        from step to step."""
        P, C = self.n_prelude, self.n_core
        caches = caches or [None] * len(blocks)
        x = self.run(blocks[:P], x, cos, sin, caches[:P])
        core, coda = blocks[P:P + C], blocks[P + C:]
        cut = 0
        if steps is None and self.training:
            steps = self.sample_steps()
            if self.config.dre_progressive > 0:  # the progressive loss's n, 0 .. r-1 (seeded apart from r's draw)
                cut = random.Random(None if self.iteration is None else ~self.iteration).randrange(steps)
        if self.training and (not isinstance(steps, int) or threshold is not None):
            raise ValueError("training runs the same number of core steps for every token (an int or None, and no "
                             "threshold)")
        if isinstance(steps, int) and threshold is None and caches[0] is None:
            return self.run(coda, self.iterate(x, core, cos, sin, steps, cut), cos, sin)
        return self.iterate_per_token(x, core, coda, cos, sin, caches[P:P + C], caches[P + C:], steps, head,
                                      threshold)

    def step(self, core, s, e, cos, sin, caches=None):
        """One core step: s_i = core(s_{i-1}), or with dre_inject e + (core(s_{i-1}) - s_{i-1})."""
        new = self.run(core, s, cos, sin, caches)
        return e + (new - s) if self.config.dre_inject else new

    def iterate(self, e, core, cos, sin, r, cut=0):
        """r core steps for every token; gradients through the last dre_backprop_steps only, and for the share
        dre_progressive of the sequences through the steps after the first `cut` only."""
        if r < 1:
            raise ValueError(f"the core needs at least 1 step, got {r}")
        with_grad = min(r, self.config.dre_backprop_steps)
        s = e
        with torch.no_grad():
            for _ in range(r - with_grad):
                s = self.step(core, s, e, cos, sin)
        if r > with_grad:  # what the skipped steps added to the stream, as a constant: the gradient reaches e along
            s = e + (s - e).detach()  # the residual path, and none reaches the core through those steps
        moes = [b.mlp for b in core if isinstance(b.mlp, MoE)]
        aux = [0.0] * len(moes)
        rows = round(self.config.dre_progressive * e.size(0)) if self.training else 0
        for i in range(r - with_grad, r):
            if rows and i == cut > 0:  # the progressive loss's sequences (the batch's first `rows`): what
                s = torch.cat([s[:rows].detach(), s[rows:]])  # the first n steps made of them is a constant
            s = self.step(core, s, e, cos, sin)
            aux = [a + moe.aux_loss for a, moe in zip(aux, moes)]
        for a, moe in zip(aux, moes):  # each MoE core layer's balancing loss: the mean over the steps with gradients
            moe.aux_loss = a / with_grad
        self.last_steps, self.last_r = torch.full(e.shape[:2], r, dtype=torch.long, device=e.device), r
        return s

    @torch.no_grad()
    def iterate_per_token(self, e, core, coda, cos, sin, caches, coda_caches, steps, head, threshold):
        """Inference: each token runs until its exit test falls below the threshold, or for its given count (as
        forward()); returns the coda's output. caches, coda_caches: StepCaches, or Nones without generation caches."""
        B, T, _ = e.shape
        if threshold is None:  # the model's own exit, or none when the steps are given
            threshold = self.config.dre_threshold if steps is None else 0.0
        by_kl = self.config.dre_exit == "kl"
        if threshold > 0 and by_kl and head is None:
            raise ValueError("exiting by dre_threshold needs the head, to compare successive predictions")
        limit = most = least = self.config.max_reasoning_steps if steps is None else steps
        if not isinstance(limit, int):  # a count per token
            limit = torch.as_tensor(steps, device=e.device)
            if limit.shape != (B, T):
                raise ValueError(f"per-token steps must have shape {(B, T)}, got {tuple(limit.shape)}")
            most, least = int(limit.max()), int(limit.min())
        if least < 1:
            raise ValueError(f"the core needs at least 1 step, got {least}")
        if caches[0] is not None and most > caches[0].steps:
            raise ValueError(f"{most} steps but the generation cache holds {caches[0].steps} (new_caches' steps)")
        # coda_kvs: each look at the prediction overwrites the last one's keys, and the last look is the final one
        kvs, coda_kvs = [StepKV(c) for c in caches], [StepKV(c) for c in coda_caches]
        s, y, logp = e, None, None
        taken = torch.zeros(B, T, dtype=torch.long, device=e.device)
        active = torch.ones(B, T, dtype=torch.bool, device=e.device)
        running = B * T  # tokens still running; while all are, nothing needs masking
        for i in range(1, most + 1):
            for kv in kvs:
                kv.step, kv.active = i - 1, (active if running < B * T else None)
            new = self.step(core, s, e, cos, sin, kvs)
            taken += active
            done = taken >= limit
            if threshold > 0 and not by_kl:  # how far this step moved the state, relative to its size
                done = done | ((new - s).float().norm(dim=-1) < threshold * new.float().norm(dim=-1))
            s = torch.where(active[..., None], new, s) if running < B * T else new
            if threshold > 0 and by_kl:  # the prediction after this step against the one after the previous step
                y = self.run(coda, s, cos, sin, coda_kvs)
                logp, last = head(y).float().log_softmax(-1), logp
                if last is not None:
                    done = done | ((logp.exp() * (logp - last)).sum(-1) < threshold)
            active = active & ~done
            running = int(active.sum())  # a host sync per step: the loop length depends on it
            if i == most or self.anyone_running(running, e.device) == 0:  # at batch 1 an easy token saves steps
                break
        if y is None:
            y = self.run(coda, s, cos, sin, coda_kvs)
        for kv in kvs + coda_kvs:
            kv.finish(i)
        self.last_steps, self.last_r = taken, None
        return y

    def anyone_running(self, running, device):
        if self.exit_group is None:
            return running
        t = torch.tensor([running], device=device)
        torch.distributed.all_reduce(t, group=self.exit_group)
        return int(t)

    @torch.no_grad()
    def observe(self, logits, targets):
        """Records each token's steps (from the last forward) and loss; targets (B, T') are the last T' positions'
        next tokens (-1: none), logits (B, T', vocab)."""
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction="none")
        self.observed.append((self.last_steps[:, -targets.size(1):].reshape(-1), loss, targets.reshape(-1) != -1))

    def metrics(self, max_steps=None):
        """Statistics of the tokens observed since the last call (then reset): mean steps, histogram of steps 1..max,
        the core's forward FLOPs per token (attention over block_size keys) and Spearman(a token's steps, its loss).
        max_steps: the most a token could run (the steps passed to the forwards); None: max_reasoning_steps."""
        if not self.observed:
            return {}
        steps, loss, keep = (torch.cat(t) for t in zip(*self.observed))
        self.observed = []
        steps, loss = steps[keep], loss[keep]
        mean, most = steps.float().mean().item(), max_steps or self.config.max_reasoning_steps
        return {"tokens": steps.numel(), "mean_steps": mean, "max_steps": most,
                "histogram": torch.bincount(steps, minlength=most + 1)[1:].tolist(),
                "core_flops_per_token": mean * self.core_flops_per_step(self.config.block_size),
                "spearman": spearman(steps.float(), loss)}


def describe(m):
    """One line for a metrics() dict."""
    if not m:
        return "dre: no tokens observed"
    hist = " ".join(f"{i + 1}:{n}" for i, n in enumerate(m["histogram"]) if n)
    return (f"dre: {m['mean_steps']:.2f} core steps per token of max {m['max_steps']} "
            f"({m['mean_steps'] / m['max_steps']:.0%} of the core compute), {m['core_flops_per_token'] / 1e6:.2f} "
            f"MFLOPs/token in the core, Spearman(steps, loss) {m['spearman']:+.3f} over {m['tokens']} tokens; "
            f"steps histogram {hist}")


def describe_drawn(steps, drawn=True):
    """The training log line for the core steps of each micro-batch since the last one."""
    return f"dre: {sum(steps) / len(steps):.2f} core steps per micro-batch" + (" (drawn)" if drawn else "")
