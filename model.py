"""
The GPT language model. Two layouts share every class: 'modern' (rotary positions, RMSNorm, SwiGLU, optional
QK-norm and grouped-query attention; numerically Llama) and 'gpt2' (learned positions, LayerNorm with bias, GELU,
tied head: OpenAI's GPT-2, whose weights convert.from_gpt2 loads). q, k and v are separate projections so that
tensor parallelism can shard each by columns; GPT-2's fused weight is split when it is loaded.
"""

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import MoE, active_params, checkpoint
from muon import Muon
from reasoning import RecurrentDepth


@dataclass
class GPTConfig:
    block_size: int = 1024      # longest sequence (and the size of the rotary / position tables)
    vocab_size: int = 50304     # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0          # key/value heads; 0 means n_head, fewer is grouped-query attention
    n_embd: int = 768
    mlp_hidden: int = 0         # 0: 4*n_embd for GELU; for SwiGLU 2/3 of that, to the nearest 64 (~same parameters)
    dropout: float = 0.0
    bias: bool = False          # biases in Linear layers and LayerNorms
    layout: str = "modern"      # 'modern' or 'gpt2' (see the top of this file)
    qk_norm: bool = False       # RMSNorm on each head's queries and keys (stabilises high learning rates)
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    grad_checkpoint: bool = False  # recompute each block in backward instead of storing its activations
    # Mixture-of-Experts (moe.py); n_expert=0 is a dense model
    n_expert: int = 0
    top_k: int = 2              # experts per token
    expert_hidden: int = 0      # each expert's SwiGLU width; 0: mlp_hidden
    moe_every: int = 1          # every moe_every-th block is MoE (the last of each group), the others dense
    n_shared_expert: int = 0    # experts every token also goes through
    capacity_factor: float = 0.0  # 0: dropless; else each expert takes at most ceil(N*top_k*factor/E) tokens
    eval_capacity_factor: float = 0.0  # the same in evaluation and sampling; 0 (dropless) keeps them batch-independent
    router_score: str = "softmax"  # 'softmax' or 'sigmoid'
    router_renormalize: bool = True  # the top_k weights sum to one (top_k > 1; at top_k=1 the weight is the score)
    moe_kernel: str = "auto"    # grouped GEMM: 'auto', 'grouped_mm' (torch._grouped_mm, bf16), 'triton' or 'loop'
    moe_balance: str = "aux"    # 'aux' (the Switch loss only) or 'bias' (DeepSeek-V3's aux-loss-free bias, too)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    # Dynamic Reasoning Engine (reasoning.py): the blocks between the first n_prelude and the last n_coda of the
    # n_layer form a core that runs several times per token, as many as the token needs at inference
    dre: bool = False
    n_prelude: int = 1
    n_coda: int = 1
    max_reasoning_steps: int = 6  # the most core steps a token runs (training draws are clipped to it)
    dre_sample_steps: bool = True  # draw the core steps per optimizer step; False: always max_reasoning_steps
    dre_mean_steps: float = 4.0  # mean core steps drawn per training step
    dre_backprop_steps: int = 6  # gradients flow through the core's last this-many steps
    dre_threshold: float = 1e-2  # inference: a token stops once the exit test's measure falls below this
    dre_exit: str = "kl"        # the exit test: 'kl' (KL between successive steps' predictions, nats; runs the coda
                                # and head every step) or 'state' (|s_i - s_{i-1}| / |s_i|, O(n_embd) per step)
    dre_inject: bool = False    # s_i = e + (core(s_{i-1}) - s_{i-1}): each step's update lands on the prelude's
                                # output e instead of piling onto the last state (input injection, as in DEQs)
    dre_progressive: float = 0.0  # this share of each batch's sequences gets Bansal et al.'s progressive loss: the
                                  # state after a drawn n < r steps is a constant, the last r - n steps must answer

    def __post_init__(self):
        if self.layout not in ("modern", "gpt2"):
            raise ValueError(f"layout must be 'modern' or 'gpt2', got {self.layout!r}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_kv_head", "mlp_hidden", "n_expert", "expert_hidden", "n_shared_expert"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 picks the default), got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout is a probability in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or min(self.aux_loss_coef, self.z_loss_coef) < 0:
            raise ValueError("rope_theta and norm_eps must be > 0, aux_loss_coef and z_loss_coef >= 0")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if not self.mlp_hidden:
            self.mlp_hidden = 4 * self.n_embd
            if self.layout == "modern":
                self.mlp_hidden = 64 * max(1, round(self.mlp_hidden * 2 / 3 / 64))
        self.expert_hidden = self.expert_hidden or self.mlp_hidden
        if self.n_expert:
            if self.layout != "modern":
                raise ValueError("Mixture-of-Experts needs layout='modern' (its experts are SwiGLU MLPs)")
            if not 1 <= self.top_k <= self.n_expert:
                raise ValueError(f"top_k={self.top_k} must be between 1 and n_expert={self.n_expert}")
            if self.moe_every < 1:
                raise ValueError(f"moe_every must be at least 1, got {self.moe_every}")
            if self.router_score not in ("softmax", "sigmoid"):
                raise ValueError(f"router_score must be 'softmax' or 'sigmoid', got {self.router_score!r}")
            if self.moe_balance not in ("aux", "bias"):
                raise ValueError(f"moe_balance must be 'aux' or 'bias', got {self.moe_balance!r}")
            for name in ("capacity_factor", "eval_capacity_factor"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name} must be >= 0 (0 is dropless), got {getattr(self, name)}")
            if self.moe_kernel not in ("auto", "grouped_mm", "triton", "loop"):
                raise ValueError(f"moe_kernel must be 'auto', 'grouped_mm', 'triton' or 'loop', "
                                 f"got {self.moe_kernel!r}")
        if self.dre:
            if min(self.n_prelude, self.n_coda) < 0 or self.n_layer - self.n_prelude - self.n_coda < 1:
                raise ValueError(f"dre needs a core: n_layer={self.n_layer} must exceed n_prelude={self.n_prelude} "
                                 f"+ n_coda={self.n_coda} (both >= 0)")
            if self.max_reasoning_steps < 1 or (self.dre_sample_steps and
                                                not 1 <= self.dre_mean_steps <= self.max_reasoning_steps):
                raise ValueError(f"dre needs 1 <= dre_mean_steps={self.dre_mean_steps} <= max_reasoning_steps="
                                 f"{self.max_reasoning_steps}")
            if self.dre_backprop_steps < 1:
                raise ValueError(f"dre_backprop_steps must be at least 1, got {self.dre_backprop_steps}")
            if not 0 <= self.dre_progressive <= 1:
                raise ValueError(f"dre_progressive is a share of the batch, 0 to 1, got {self.dre_progressive}")
            if self.dre_exit not in ("kl", "state"):
                raise ValueError(f"dre_exit must be 'kl' or 'state', got {self.dre_exit!r}")
            if self.dre_threshold < 0:
                raise ValueError(f"dre_threshold must be >= 0 (0 runs every token max_reasoning_steps steps), "
                                 f"got {self.dre_threshold}")

    def is_moe(self, layer):
        return self.n_expert > 0 and layer % self.moe_every == self.moe_every - 1

    @classmethod
    def defaults(cls):
        """Every field with its default: train.py, bench.py and model.py's command line take them as settings."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_settings(cls, settings, **overrides):
        """The config from those of a dict's keys that are fields (a script's settings), then the overrides."""
        names = cls.defaults()
        return cls(**{**{k: v for k, v in settings.items() if k in names}, **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # written out rather than F.rms_norm: on the CPU this is ~1.5x faster (F.rms_norm is not fused there)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).type_as(x)


def Norm(config):
    if config.layout == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(config.n_embd, config.norm_eps)


def rotary_tables(head_dim, length, theta):
    """cos and sin of each position's angles, (length, 1, head_dim), laid out for apply_rotary: dimension i of the
    first half pairs with dimension i of the second half (the GPT-NeoX convention), and sin carries the sign."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1)[:, None, :], torch.cat([-sin, sin], -1)[:, None, :]


def apply_rotary(x, cos, sin):
    # x: (B, T, heads, head_dim). (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in 4 ops rather than 7
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([x2, x1], dim=-1) * sin.to(x.dtype)


class KVCache:
    """Keys and values of one layer for the tokens generated so far; the tensors grow up to `length` positions."""

    def __init__(self, length):
        self.length, self.pos, self.k, self.v = length, 0, None, None

    def update(self, k, v):
        B, T, H, D = k.shape
        if self.k is None:
            self.k = k.new_empty(B, self.length, H, D)
            self.v = v.new_empty(B, self.length, H, D)
        self.k[:, self.pos:self.pos + T] = k
        self.v[:, self.pos:self.pos + T] = v
        self.pos += T
        return self.k[:, :self.pos], self.v[:, :self.pos]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.rotary = config.layout == "modern"
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=config.bias)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        # local head counts: under tensor parallelism each rank holds a slice of the heads
        q = self.c_q(x).view(B, T, -1, self.head_dim)
        k = self.c_k(x).view(B, T, -1, self.head_dim)
        v = self.c_v(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(k, v)
        dropout = self.dropout if self.training else 0.0
        # SDPA picks its own FlashAttention kernel on CUDA (bf16/fp16, no mask), so no flash-attn package is needed
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        if start > 0 and T > 1:  # a chunk after cached tokens: SDPA's is_causal would align to the first key
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=(start == 0 and T > 1),
                                           enable_gqa=q.size(1) != k.size(1))
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or config.mlp_hidden
        self.swiglu = config.layout == "modern"
        if self.swiglu:
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config)
        self.mlp = MoE(config) if config.is_moe(layer) else MLP(config)
        if config.is_moe(layer) and config.n_shared_expert:  # experts every token goes through, as one dense MLP
            self.mlp.shared = MLP(config, config.n_shared_expert * config.expert_hidden)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.ln_1(x), cos, sin, cache)
        return x + self.mlp(self.ln_2(x))


def run_block(block, x, cos, sin, cache, grad_checkpoint):
    if grad_checkpoint and cache is None:  # recompute the block's activations in backward rather than store them
        return checkpoint(block, x, cos, sin)
    return block(x, cos, sin, cache)


class Sequential(nn.Module):
    """How the GPT runs its blocks: here each once, in order (the dense path). reasoning.RecurrentDepth is the
    other implementation, which runs the middle blocks several times; both take and return the residual stream."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, x, blocks, cos, sin, caches=None, steps=None, head=None, threshold=None):
        for i, block in enumerate(blocks):
            x = run_block(block, x, cos, sin, caches[i] if caches else None,
                          self.config.grad_checkpoint and self.training)
        return x

    def new_caches(self, length, steps=None):
        return [KVCache(length) for _ in range(self.config.n_layer)]

    def training_flops_per_token(self, active_params, seq_len):
        # 6 per matmul parameter a token uses (forward 2, backward 4) plus attention's 12*n_layer*n_embd*T (PaLM)
        return 6 * active_params + 12 * self.config.n_layer * self.config.n_embd * seq_len


def empty_keeping_ties(model, device):
    """model.to_empty(device=device), keeping tied weights tied (it can give each name a tensor of its own)."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    model.to_empty(device=device)
    for first, *others in names.values():
        for name in others:
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, model.get_parameter(first))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=Norm(config),
        ))
        if config.layout == "gpt2":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        # how h runs: each block once, or as prelude -> core (repeated) -> coda, the core's blocks in h once
        self.depth = RecurrentDepth(config, self.transformer.h) if config.dre else Sequential(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # (materialize() replays these draws, in this order, one module at a time: keep the two in step)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink the projections that feed it
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp.w2")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def materialize(self, device, modules=(), draw=True):
        """For a GPT built on `meta` and laid out across ranks (parallel.parallelize, which may have trimmed it to a
        pipeline stage): storage on `device` and GPT(config)'s initial weights, no rank ever holding the whole model.
        GPT.__init__'s draws from the global generator are replayed in its order on the CPU, one module at a time,
        and each parameter keeps its rank's part of each value, so a seed gives the weights one process gets
        (tests/test_model.py checks it). `modules`: what else holds buffers of its own (a pipeline's stages).
        draw=False: storage and buffers only, for weights a checkpoint is about to load."""
        from torch.distributed.tensor import DTensor, Replicate
        empty_keeping_ties(self, device)
        for m in modules:
            empty_keeping_ties(m, device)
        config = self.config
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        tables = {"rope_cos": cos, "rope_sin": sin}
        for name, buf in itertools.chain(*(m.named_buffers() for m in (self, *modules))):
            table = tables.get(name.rpartition(".")[2])
            if table is None:
                buf.zero_()  # MoE counters and routing biases
            else:
                buf.copy_(table[:len(buf)])
        if not draw:
            return
        mine = dict(self.named_parameters(remove_duplicate=False))

        def put(values):  # this rank's part of each (name, value), where it holds that parameter
            for name, value in values:
                if (p := mine.get(name)) is not None:
                    if isinstance(p, DTensor):  # (slicing a replicated value needs no collective)
                        mesh = p.device_mesh
                        value = DTensor.from_local(value.detach().to(p.device), mesh, [Replicate()] * mesh.ndim,
                                                   run_check=False).redistribute(placements=p.placements)
                    p.copy_(value)

        def built(prefix, module):
            return module.named_parameters(prefix, remove_duplicate=False)

        cpu = torch.device("cpu")
        with torch.device(cpu):  # what each module draws as __init__ builds it (most of it drawn again below)
            put(built("transformer.wte", nn.Embedding(config.vocab_size, config.n_embd)))
            for i in range(config.n_layer):
                put(built(f"transformer.h.{i}", Block(config, i)))
            put(built("transformer.ln_f", Norm(config)))
            if config.layout == "gpt2":
                put(built("transformer.wpe", nn.Embedding(config.block_size, config.n_embd)))
            put(built("lm_head", nn.Linear(config.n_embd, config.vocab_size, bias=False)))
        with torch.device("meta"):
            shape = GPT(config)  # the whole model's modules, in __init__'s order
        names = {m: name for name, m in shape.named_modules()}

        def redraw(module):  # self.apply(self._init_weights), a module at a time
            if isinstance(module, (nn.Linear, nn.Embedding)):
                shape._init_weights(module.to_empty(device=cpu))
                put(built(names[module], module))
                module.to("meta")
        shape.apply(redraw)
        std = 0.02 / math.sqrt(2 * config.n_layer)  # and the rescaled projections
        put((name, torch.empty(p.shape, device=cpu).normal_(0.0, std)) for name, p in shape.named_parameters()
            if name.endswith(("c_proj.weight", "mlp.w2")))

    def num_params(self, non_embedding=True, active=False):
        """Parameter count; non_embedding leaves out the lookup tables (but keeps the head, which is a matmul);
        active counts, of each MoE layer's routed experts, only the top_k a token uses."""
        n = active_params(self) if active else sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def moe_layers(self):
        return [m for m in self.transformer.h.modules() if isinstance(m, MoE)]  # h: a pipeline stage's share too

    def moe_loss(self):
        """The MoE layers' balancing losses (aux + z) from the last forward, for train.py to add; 0 if dense."""
        zero = torch.zeros((), device=self.lm_head.weight.device)
        return sum((moe.aux_loss for moe in self.moe_layers() if moe.aux_loss is not None), zero)

    def crop_block_size(self, block_size):
        """Shrinks the context window (e.g. to fine-tune GPT-2, trained at 1024, with shorter sequences)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    def hidden(self, idx, caches=None, steps=None, threshold=None):
        """The final normalised hidden states, (B, T, n_embd); `caches` (one KVCache per layer) for generation;
        `steps` and `threshold` set a DRE model's core steps (see RecurrentDepth.forward)."""
        B, T = idx.shape
        start = caches[0].pos if caches else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.transformer.drop(x)
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        head = lambda y: self.lm_head(self.transformer.ln_f(y))  # noqa: E731 (the DRE's exit test reads predictions)
        return self.transformer.ln_f(self.depth(x, self.transformer.h, cos, sin, caches, steps, head, threshold))

    def forward(self, idx, targets=None, steps=None, threshold=None):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy over targets that are not -1.
        `steps`: a DRE model's core steps, an int or one per token (B, T); None samples them in training and lets
        each token stop by dre_threshold at inference, after at most max_reasoning_steps. `threshold` (inference):
        each token stops by this instead, `steps` being the most it runs (None: max_reasoning_steps)."""
        logits = self.lm_head(self.hidden(idx, steps=steps, threshold=threshold))
        loss = None
        if targets is not None:
            if hasattr(logits, "device_mesh"):  # tensor parallelism: logits split by vocabulary (parallel.py)
                from parallel import vocab_parallel_loss
                loss = vocab_parallel_loss(logits, targets)
            else:
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, observe=None,
                 stop=None, steps=None, threshold=None):
        """Continues idx (B, T) by max_new_tokens tokens. With the KV cache each new token costs one position's
        forward. When the context window is full the cache restarts from the newest half of it, so the context a
        token sees stays between block_size/2 and block_size tokens while the re-encoding cost is amortised.
        observe(logits (B, 1, vocab), next_ids (B, 1)) is called for each new token (sample.py: DRE metrics);
        stop(idx) after each, and a true result ends generation early (the chat template's END, serve.py's stream).
        steps (an int) and threshold: a DRE model's core steps, as in forward()."""
        block_size, caches = self.config.block_size, None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self.lm_head(self.hidden(idx[:, -block_size:], steps=steps, threshold=threshold)[:, -1])
            else:
                if caches is None or caches[0].pos == block_size:
                    keep = block_size if caches is None else block_size // 2
                    caches = self.depth.new_caches(block_size, steps)
                    h = self.hidden(idx[:, -keep:], caches, steps, threshold)
                else:
                    h = self.hidden(idx[:, -1:], caches, steps, threshold)
                logits = self.lm_head(h[:, -1])
            idx_next = sample_next(logits.float(), temperature, top_k, top_p)
            if observe is not None:
                observe(logits[:, None], idx_next)
            idx = torch.cat((idx, idx_next), dim=1)
            if stop is not None and stop(idx):
                break
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw", impl=None):
        """A list of optimizers. 'adamw': decay on matrices and embeddings, none on gains and biases.
        'muon': Muon (orthogonalised momentum) for the blocks' 2-D weights, AdamW for embeddings, head and gains;
        Muon's lr is rescaled to match AdamW's update size, so one learning_rate serves both. `impl`: AdamW's
        implementation keywords (parallel.optimizer_kwargs); by default fused."""
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}")
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        # Muon takes 2-D matrices only: the router (a tiny classifier) and stacked 3-D experts stay with AdamW
        hidden = [p for n, p in params.items() if optimizer == "muon" and n.startswith("transformer.h.")
                  and p.dim() == 2 and "router" not in n]
        ids = {id(p) for p in hidden}
        rest = [p for p in params.values() if id(p) not in ids]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        impl = impl or {"fused": device_type in ("cuda", "cpu")}
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **impl)
        if optimizer == "adamw":
            return [adamw]
        return [Muon(hidden, lr=learning_rate, weight_decay=weight_decay, momentum=0.95,
                     adjust_lr_fn="match_rms_adamw"), adamw]

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6 per matmul parameter a token uses (forward 2, backward 4; for MoE only the
        active experts) plus attention (PaLM, appendix B); a DRE core counts the steps it runs."""
        return self.depth.training_flops_per_token(self.num_params(active=True), seq_len or self.config.block_size)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token id per row of logits (B, vocab). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of tokens whose probability reaches top_p (the most likely token always stays)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


if __name__ == "__main__":
    # python model.py config/medium_moe.py [--n_expert=16 ...]: the model a config builds, without building it
    import sys

    import configurator
    shape = configurator.apply(GPTConfig.defaults(), sys.argv[1:], skip_unknown_in_files=True)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = GPT(GPTConfig(**shape))
    total, active = model.num_params(non_embedding=False), model.num_params(non_embedding=False, active=True)
    print(f"{model.config}\nparameters: {total:,} total, {active:,} active per token "
          f"({len(model.moe_layers())} MoE layers); training FLOPs per token: {model.flops_per_token():.3e}")
