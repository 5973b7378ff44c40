"""
Pipeline parallelism on torch.distributed.pipelining (parallel.py's pp_size > 1). The blocks are cut into
pp_size x pp_virtual_stages stages of equal depth, the embedding with the first and the final norm and head with the
last; rank r of the mesh's pp dimension holds stages r, r+pp, ...; a schedule (1F1B, GPipe, Interleaved1F1B) runs
forward and backward over pieces of each micro-batch, passing the residual stream between ranks. The layout
(ddp, fsdp, tp) applies among the ranks of a stage, as parallel.parallelize arranges.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from moe import MoE, checkpoint, local

PP_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B")


def check_pipeline(config, world_size, ep_size, dtype, pp_size, schedule, microbatches, virtual):
    """check_layout's questions about the pipeline settings."""
    for name, value in (("pp_size", pp_size), ("pp_microbatches", microbatches), ("pp_virtual_stages", virtual)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if config.dre:
        raise ValueError("dre is not supported with pipeline parallelism: its core blocks run a number of times "
                         "decided per token (and per step), which fixed stages with fixed messages cannot follow")
    if schedule not in PP_SCHEDULES:
        raise ValueError(f"pp_schedule must be one of {', '.join(PP_SCHEDULES)}, got {schedule!r}")
    if (virtual > 1) != (schedule == "Interleaved1F1B") or pp_size == 1:
        raise ValueError(f"pp_virtual_stages={virtual} with pp_schedule={schedule!r}: Interleaved1F1B runs 2 or "
                         f"more virtual stages per rank, 1F1B and GPipe one" + " (with pp_size > 1)" * (pp_size == 1))
    if config.n_layer % (pp_size * virtual):
        raise ValueError(f"pipeline parallelism splits n_layer={config.n_layer} into pp_size x pp_virtual_stages = "
                         f"{pp_size * virtual} stages of equal depth: n_layer must be divisible by {pp_size * virtual}")
    if schedule == "1F1B" and microbatches < pp_size:
        raise ValueError(f"1F1B needs at least as many micro-batches as stages: pp_microbatches={microbatches} < "
                         f"pp_size={pp_size}")
    if schedule == "Interleaved1F1B" and microbatches % max(1, microbatches // pp_size):
        raise ValueError(f"Interleaved1F1B runs pp_microbatches={microbatches} in rounds of pp_size={pp_size}: "
                         f"use a multiple of {pp_size}")
    if pp_size > 1 and not dist.is_initialized() or world_size % pp_size:
        raise ValueError(f"pp_size={pp_size} needs a multiple of {pp_size} processes: launch with torchrun "
                         f"--nproc_per_node=N")
    if ep_size > 1:
        raise ValueError("ep_size > 1 with pp_size > 1 is not supported yet: use one of the two")
    if dtype == "float16":
        raise ValueError("pp_size > 1 works with fp32 and bf16 (the schedule runs backward, without GradScaler)")


class PipelinePart(nn.Module):
    """One pipeline stage of a GPT: consecutive blocks, with the embedding on the first stage and the final norm and
    head on the last. Its modules are the GPT's own under the GPT's names (block 5 stays transformer.h.5), so state
    dicts and distributed checkpoints are the whole model's. Token ids or the residual stream (under tensor
    parallelism this rank's slice of the sequence) in; the residual stream or logits out."""

    def __init__(self, gpt, layers, first, last, seq_len):
        super().__init__()
        self.config, self.seq_len, self.weight = gpt.config, seq_len, 1.0
        keep = ("wte", "wpe", "drop") * first + ("ln_f",) * last
        self.transformer = nn.ModuleDict({k: m for k, m in gpt.transformer.items() if k in keep})
        self.transformer["h"] = nn.ModuleDict({str(i): gpt.transformer.h[i] for i in layers})
        self.lm_head = gpt.lm_head if last else None
        self.register_buffer("rope_cos", gpt.rope_cos, persistent=False)
        self.register_buffer("rope_sin", gpt.rope_sin, persistent=False)
        self.moe_loss = 0.0  # the balancing losses of this stage's layers since Pipeline.forward began, weighted

    def forward(self, x):
        t = self.transformer
        if "wte" in t:
            x = t.drop(t.wte(x) + (t.wpe(torch.arange(x.shape[1], device=x.device)) if "wpe" in t else 0))
        cos, sin = self.rope_cos[:self.seq_len], self.rope_sin[:self.seq_len]
        for block in t.h.values():
            x = checkpoint(block, x, cos, sin) if self.config.grad_checkpoint and self.training else block(x, cos, sin)
        x = self.lm_head(t.ln_f(x)) if self.lm_head is not None else x
        aux = [m.aux_loss for m in t.h.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        if aux and self.training and torch.is_grad_enabled():
            aux = sum(aux) * self.weight
            self.moe_loss += aux.detach()
            x = _CarryLoss.apply(x, aux)
        return x


class _CarryLoss(torch.autograd.Function):
    """The identity on a stage's output that, in backward, also starts the backward of `loss`: the MoE balancing
    losses, which never reach the pipeline's loss function (Megatron's MoEAuxLossAutoScaler does the same)."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.like = loss.detach()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones_like(ctx.like)


class Pipeline(nn.Module):
    """This rank's stages, run by a torch.distributed.pipelining schedule over mesh['pp']: rank r holds stages r,
    r+pp, ... (Interleaved1F1B's virtual stages), each wrapped by the layout over mesh['dp'] (and mesh['tp']).
    model(x, y) is one gradient-accumulation micro-step cut into `microbatches` pieces: forward and backward in
    training, forward only in eval mode; it returns (None, mean loss) on the last stage's ranks, (None, 0) elsewhere.
    `model` is trimmed in place to this rank's share: what the optimizer steps and checkpoints save. fsdp:
    fully_shard's arguments, or {}; tensor_parallel: (parallel.apply_tensor_parallel, parallel.vocab_parallel_loss),
    for a part and for its logits split by vocabulary (tp > 1): passed in, so that this file imports no parallel.py."""

    def __init__(self, model, mesh, device_type, fsdp, tensor_parallel, schedule, microbatches, virtual, accumulation,
                 batch, seq_len):
        from torch.distributed import pipelining
        super().__init__()
        tensor_parallel, self.vocab_parallel_loss = tensor_parallel
        config, pp, tp, dp = model.config, mesh["pp"].size(), mesh["tp"].size(), mesh["dp"]
        n = pp * virtual
        ids, per = range(mesh["pp"].get_local_rank(), n, pp), config.n_layer // n
        device = torch.device(device_type, torch.cuda.current_device() if device_type == "cuda" else None)
        parts = [PipelinePart(model, range(s * per, (s + 1) * per), s == 0, s == n - 1, seq_len) for s in ids]
        # what this rank keeps; a tied embedding and head stay together (one matrix under both names, as in one
        # process, so that checkpoints name it and its optimizer state alike), on the first and the last stage
        first, last, tied = 0 in ids, n - 1 in ids, config.tie_embeddings
        model.transformer.h = nn.ModuleDict({k: m for p in parts for k, m in p.transformer.h.items()})
        for name in ("wte",) * (not first and not (last and tied)) + ("wpe",) * (not first) + ("ln_f",) * (not last):
            if name in model.transformer:
                del model.transformer[name]
        if not last and not (first and tied):
            del model.lm_head
        self.weight = 1.0 / (microbatches * accumulation)  # each piece's share of the step's mean loss
        self.ends = [m for m in (parts[0].transformer["wte"] if first and tied else None,
                                 parts[-1].lm_head if last and tied else None) if m is not None]
        self.group = mesh["pp"].get_group()
        # a tied embedding and head are one matrix on the first and the last stage: its gradient is summed over
        # each such pair of ranks. Routing biases follow the load of all of a stage's tokens, on all its ranks
        groups = [mesh.mesh[[0, -1]].reshape(2, -1).T.tolist(), mesh.mesh.reshape(pp, -1).tolist()]
        self.tied_group, stage_group = (dist.new_subgroups_by_enumeration(g)[0] for g in groups)
        for moe in model.moe_layers():
            moe.load_group = stage_group
        for part in parts:
            part.weight = self.weight
            if tp > 1:
                tensor_parallel(part, mesh["tp"])  # the embedding and head split by vocabulary, as in plain tp
            for block in part.transformer.h.values():
                if fsdp:
                    from torch.distributed.fsdp import fully_shard
                    fully_shard(block, mesh=dp, **fsdp)
            if fsdp:
                fully_shard(part, mesh=dp, **fsdp)  # the rest: embedding, final norm, head
        if tied and first:  # fully_shard and the tp plan give the part's copy a new (sharded) parameter: tie again
            model.lm_head.weight = model.transformer.wte.weight
        elif tied and last:
            model.transformer.wte.weight = model.lm_head.weight
        self.pieces, self.stage_parts = microbatches, parts  # (plain list: the parts are registered below)
        self.grads_in_buckets = not fsdp and dp.size() > 1  # (as parallel.Layout's)
        if self.grads_in_buckets:
            parts = [DDP(p, process_group=dp.get_group(), broadcast_buffers=False, gradient_as_bucket_view=True,
                         device_ids=[device.index] if device_type == "cuda" else None) for p in parts]
        self.parts = nn.ModuleList(parts)
        # the messages between stages, for one piece of the micro-batch: the residual stream (in FSDP's compute
        # dtype), ids into the first stage, logits out of the last (under tp a DTensor split by vocabulary, which
        # goes to loss_fn only: the schedule checks no last stage's output)
        b, act = batch // microbatches, fsdp["mp_policy"].param_dtype if fsdp else None
        meta = lambda *shape, dtype=act or torch.float32: torch.empty(  # noqa: E731
            shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)
        hidden = meta(b, seq_len // tp, config.n_embd)
        stages = [pipelining.PipelineStage(
            part, s, n, device, group=self.group, input_args=meta(b, seq_len, dtype=torch.long) if s == 0 else hidden,
            output_args=meta(b, seq_len, config.vocab_size) if s == n - 1 else hidden) for s, part in zip(ids, parts)]
        kind = getattr(pipelining, f"Schedule{schedule}")
        self.schedule = kind(stages if virtual > 1 else stages[0], microbatches, loss_fn=self.loss_fn,
                             scale_grads=False)

    def loss_fn(self, logits, targets):
        if hasattr(logits, "device_mesh"):  # tensor parallelism: the logits split by vocabulary (as model.py's loss)
            return self.vocab_parallel_loss(logits, targets) * self.weight
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1) * self.weight

    def forward(self, x, y):
        losses = []
        for part in self.stage_parts:
            part.moe_loss = torch.zeros((), device=x.device)
        run = self.schedule.step if self.training else self.schedule.eval
        run(x, target=y, losses=losses, **{"return_outputs": False} if self.training else {})
        loss = torch.stack(losses).sum() / (self.weight * self.pieces) if losses else torch.zeros((), device=x.device)
        return None, loss.detach()

    def backward(self, loss):
        pass  # the schedule ran backward piece by piece, inside forward

    def no_sync(self, sync):
        pass  # each stage reduces its gradients after each micro-step's schedule (its pieces are the accumulation)

    def moe_loss(self):
        """The balancing losses of this rank's stages in the last micro-step, the mean over its pieces."""
        return sum(p.moe_loss for p in self.stage_parts) / (self.weight * self.pieces)

    def finish_backward(self):
        """After a step's last backward: the tied embedding's gradient summed over its two stages."""
        for end in self.ends:
            p = end.weight
            if hasattr(p, "placements") and p.grad.placements != p.placements:
                # under tp DTensor computes the embedding's gradient whole (replicated): this rank's rows, as the head's
                p.grad = p.grad.redistribute(placements=p.placements)
            dist.all_reduce(local(p.grad), group=self.tied_group)

    def clip_grad_norm_(self, max_norm):
        """The gradient norm over all stages (a tied embedding counted once) clipped to max_norm, as one process."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        head = [m.weight for m in self.ends if isinstance(m, nn.Linear)]  # the tied matrix's second copy
        sq = [torch.linalg.vector_norm(p.grad) ** 2 for p in self.parameters() if p.grad is not None and
              not any(p is h for h in head)]
        total = torch.stack([s.full_tensor() if hasattr(s, "full_tensor") else s for s in sq]).sum()
        dist.all_reduce(total, group=self.group)
        coef = (max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef)
        return total.sqrt()
