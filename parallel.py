"""
Training on many devices with plain torch.distributed under torchrun. The layouts (train.py's `parallel`), each
checked against one process by tests/test_parallel.py:
- 'ddp': the whole model on every rank, gradients averaged (DistributedDataParallel).
- 'fsdp': parameters, gradients and optimizer state sharded (fully_shard per block, then the root: ZeRO-3; a DRE's
  core blocks, which run several times a step, go with the root).
- 'tp': Megatron tensor parallelism with DTensor: heads and hidden units split across the ranks, and between blocks
  the residual stream split along the sequence (sequence parallelism).
- 'fsdp+tp': a (dp, tp) mesh: tp inside each group of tp_size ranks, fsdp across the groups.
- ep_size > 1 (with 'ddp' or 'fsdp'): expert parallelism. Each group of ep_size consecutive ranks splits every MoE
  layer's experts between them, and the routed tokens travel to their experts' ranks and back (all_to_all); the
  rest of the model is data parallel over all ranks as the layout says. (The experts' part is moe.py's.)
- pp_size > 1 (with any layout): pipeline parallelism on torch.distributed.pipelining, a (pp, dp, tp) mesh. The
  blocks are split into stages, each rank runs its stages on pieces of each micro-batch under a schedule (1F1B,
  GPipe, Interleaved1F1B), and the layout applies among the ranks of a stage (pipeline.py).
Also here: everything else that only layouts need (starting and ending the processes, the stop agreement between
ranks, Megatron's f/g, clipping over DTensors). Distributed checkpoints are checkpoint.py's.
"""

import math
import os
import select
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from moe import MoE, apply_expert_parallel
from pipeline import Pipeline, check_pipeline

# imported where used: DTensor, FSDP and DCP take seconds to import, which a single-process run need not pay

LAYOUTS = ("none", "ddp", "fsdp", "tp", "fsdp+tp")


def init_distributed(device, backend="auto"):
    """Joins the process group torchrun describes in the environment. Returns (rank, local_rank, world_size,
    device); a plain `python train.py` (no torchrun variables) is rank 0 of 1."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    present = [n for n in names if n in os.environ]
    if not present:
        return 0, 0, 1, device
    if len(present) != len(names):
        missing = ", ".join(n for n in names if n not in os.environ)
        raise RuntimeError(f"torch.distributed environment is half set ({missing} missing); launch with torchrun")
    rank, local_rank, world_size = (int(os.environ[n]) for n in names[:3])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    # a worker group that torchrun restarts (--max-restarts) meets in the same store as the one it replaces: under
    # a prefix of its own, or a rank can read a dead rank's address (gloo) or id (NCCL) left by the last attempt
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    return rank, local_rank, world_size, device


def teardown():
    if dist.is_initialized():
        dist.barrier()  # without it gloo can abort when one rank leaves while another is still in a collective
        dist.destroy_process_group()


def exit_process(code=0):
    """Ends the process after teardown(). A torchrun worker leaves with os._exit, skipping the interpreter's
    finalization: gloo's worker threads may still be dropping their last work (and the tensors it holds) then, and a
    thread that needs the GIL once finalization has begun is unwound by force, which inside a C++ destructor is
    std::terminate: a SIGABRT ("terminate called without an active exception") after a finished run."""
    distributed = dist.is_initialized()
    teardown()
    if not distributed:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def watch_signals(stop_grace, last_checkpoint, say=True):
    """SIGTERM and Ctrl-C: the first sets the returned Event (the training loop then stops after this step, with a
    checkpoint, within stop_grace seconds); a second one exits at once (the checkpoint on disk stays whole: writes go
    to a temporary file). Python runs signal handlers only between bytecodes, and the main thread may sit in one long
    C++ call (a collective, a big kernel), so a thread hears the signals through the wakeup fd and acts on them
    itself. torchrun runs each worker in a session of its own and forwards what it gets, so a Ctrl-C there reaches
    every worker once. last_checkpoint() says, in words, what is on disk; say=False keeps this rank quiet."""
    requested = threading.Event()
    receive, send = socket.socketpair()
    send.setblocking(False)
    signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # the thread below does the work

    def tell(text):
        if say:
            print(text, flush=True)

    def run(send):  # holds the sending end: were it collected, its socket would close
        first = None
        while True:
            wait = None if first is None else max(0.0, first + stop_grace - time.monotonic())
            if not select.select([receive], [], [], wait)[0]:
                tell(f"error: the step and the save did not finish within stop_grace={stop_grace:g} s; exiting "
                     f"without saving; {last_checkpoint()}. A big model needs a larger stop_grace (and torchrun "
                     f"--shutdown-timeout above it)")
                os._exit(1)
            for _ in receive.recv(64):  # one byte per signal
                if first is None:
                    first = time.monotonic()
                    requested.set()
                    tell(f"stopping: a checkpoint will be saved after this step (within stop_grace={stop_grace:g} "
                         f"s); press Ctrl-C again to quit at once")
                else:
                    tell(f"second signal: quitting now, without saving; {last_checkpoint()}")
                    os._exit(130)

    threading.Thread(target=run, args=(send,), daemon=True, name="signals").start()
    return requested


def fail_fast(rank):
    """Under torchrun: an exception on one rank ends its process at once, with no collective on the way out; torchrun
    then stops the other ranks, which would otherwise wait in their next collective until its timeout."""
    def hook(kind, value, tb):
        sys.stdout.flush()
        sys.__excepthook__(kind, value, tb)
        print(f"error: rank {rank} failed: {kind.__name__}: {value}", file=sys.stderr, flush=True)
        os._exit(1)

    sys.excepthook = hook


def check_layout(layout, tp_size, world_size, config, batch_size, block_size, gradient_accumulation_steps,
                 optimizer="adamw", dtype="float32", ep_size=1, pp_size=1, pp_schedule="1F1B", pp_microbatches=1,
                 pp_virtual_stages=1):
    """Every reason a layout cannot work, found before any work is done. Raises ValueError."""
    if pp_size != 1 or pp_virtual_stages != 1:
        check_pipeline(config, world_size, ep_size, dtype, pp_size, pp_schedule, pp_microbatches, pp_virtual_stages)
    if ep_size < 1:
        raise ValueError(f"ep_size must be at least 1, got {ep_size}")
    if ep_size > 1:
        if not config.n_expert:
            raise ValueError(f"ep_size={ep_size} splits the experts of a Mixture-of-Experts model, but this one is "
                             "dense: set n_expert, or ep_size=1")
        if config.n_expert % ep_size:
            raise ValueError(f"expert parallelism splits n_expert={config.n_expert} across ep_size={ep_size} ranks: "
                             f"n_expert must be divisible by ep_size")
        if world_size % ep_size:
            raise ValueError(f"the world size {world_size} is not divisible by ep_size={ep_size}: launch a multiple "
                             f"of {ep_size} processes (torchrun --nproc_per_node)")
        if layout not in ("ddp", "fsdp"):
            raise ValueError(f"ep_size={ep_size} works with parallel='ddp' or 'fsdp', not {layout!r}"
                             + (" (expert parallelism with tensor parallelism is not supported yet)"
                                if "tp" in layout else ""))
        if config.dre:
            raise ValueError("dre is not supported with expert parallelism yet (it is with ddp and fsdp): at "
                             "inference every rank of a group would have to run as many core steps as the slowest")
        if optimizer == "muon" or dtype == "float16":
            raise ValueError(f"ep_size={ep_size} works with optimizer='adamw' and fp32/bf16 only")
    if layout not in LAYOUTS:
        raise ValueError(f"parallel must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout != "none" and not dist.is_initialized():
        raise ValueError(f"parallel={layout!r} needs several processes: launch with torchrun --nproc_per_node=N")
    if layout == "none" and world_size > pp_size:
        raise ValueError(f"parallel='none' with {world_size} processes would train {world_size} unrelated models; "
                         "pick 'ddp', 'fsdp', 'tp' or 'fsdp+tp'")
    tp = tp_size if "tp" in layout else 1
    if tp < 1 or world_size % (tp * pp_size):
        raise ValueError(f"the world size {world_size} is not divisible by tp_size={tp_size}"
                         + f" x pp_size={pp_size}" * (pp_size > 1))
    if layout == "tp" and world_size != tp * pp_size:
        raise ValueError(f"parallel='tp' uses all {world_size} ranks as one tensor-parallel group: set "
                         f"tp_size={world_size // pp_size}, or use 'fsdp+tp' to add data parallelism across groups")
    if layout == "fsdp+tp" and world_size == tp * pp_size:
        raise ValueError(f"fsdp+tp needs more ranks than tp_size={tp_size} (world size {world_size}); use 'tp'")
    if tp > 1:
        # what is split: heads, the MLPs' and experts' hidden units, and (between blocks) the sequence
        widths = {"n_head": config.n_head, "n_kv_head": config.n_kv_head, "block_size": block_size}
        if any(not config.is_moe(i) for i in range(config.n_layer)):
            widths["mlp_hidden"] = config.mlp_hidden
        if config.n_expert:
            widths["expert_hidden"] = config.expert_hidden
        for name, value in widths.items():
            if value % tp:
                raise ValueError(f"tensor parallelism splits {name}={value} across tp_size={tp} ranks: "
                                 f"it must be divisible by {tp}")
        if config.layout != "modern":
            raise ValueError("tensor parallelism supports layout='modern' only")
        if config.dre:
            raise ValueError("dre is not supported with tensor parallelism yet (it is with ddp and fsdp): its exit "
                             "test compares each token's predictions while every rank holds a slice of the sequence")
        if config.qk_norm and layout == "fsdp+tp":
            raise ValueError("qk_norm is not supported with fsdp+tp yet (it is with tp and with fsdp)")
    dp = world_size // tp // pp_size
    if gradient_accumulation_steps % dp and batch_size % dp:
        raise ValueError(f"the batch is too small for {dp} data-parallel ranks: neither gradient_accumulation_steps="
                         f"{gradient_accumulation_steps} nor batch_size={batch_size} is a multiple of {dp}")
    per_rank = batch_size if gradient_accumulation_steps % dp == 0 else batch_size // dp
    if pp_size > 1 and per_rank % pp_microbatches:
        raise ValueError(f"pp_microbatches={pp_microbatches} does not divide the {per_rank} sequences of each "
                         f"micro-batch (batch_size={batch_size}" + f" over {dp} data-parallel ranks" * (per_rank
                         != batch_size) + "): set pp_microbatches to a divisor of it, or batch_size to a multiple")
    if layout in ("fsdp", "tp", "fsdp+tp") and (optimizer == "muon" or dtype == "float16"):
        raise ValueError(f"parallel={layout!r} works with optimizer='adamw' and fp32/bf16 only")


def mesh_and_ranks(layout, tp_size, world_size, device_type, pp_size=1):
    """The device mesh (None for 'none'/'ddp' without pipeline) and this rank's place in the data-parallel
    dimension. Under pipeline parallelism the mesh is (pp, dp, tp): consecutive ranks share a stage (tp innermost),
    so on two nodes with pp_size=2 each node holds one stage and only activations cross between them."""
    if layout in ("none", "ddp") and pp_size == 1:
        return None, (dist.get_rank() if dist.is_initialized() else 0), world_size
    from torch.distributed.device_mesh import init_device_mesh
    tp = tp_size if "tp" in layout else 1
    dp = world_size // tp // pp_size
    if pp_size == 1:
        mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    else:
        mesh = init_device_mesh(device_type, (pp_size, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    return mesh, mesh["dp"].get_local_rank(), dp


def parallelize(model, layout, mesh, device_type, param_dtype=None, reshard_after_forward=True, cpu_offload=False,
                ep_size=1, pipeline=None):
    """Wraps the model for the layout. param_dtype (GPU fsdp only): compute in it, reduce gradients in fp32.
    ep_size > 1: the experts are split first (apply_expert_parallel), and the layout leaves them alone.
    pipeline (pp_size > 1): Pipeline's settings; it returns a Pipeline, and trims `model` to this rank's share.
    Otherwise a Layout: either way the training step makes the same calls."""
    if layout == "none" and not pipeline:
        return Layout(model, model, layout)
    experts = apply_expert_parallel(model, ep_size, device_type) if ep_size > 1 else {}
    fsdp = {}
    if "fsdp" in layout:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        fsdp = dict(reshard_after_forward=reshard_after_forward, offload_policy=CPUOffloadPolicy() if cpu_offload
                    else OffloadPolicy(), mp_policy=MixedPrecisionPolicy(param_dtype, reduce_dtype=torch.float32))
    if pipeline:
        return Pipeline(model, mesh, device_type, fsdp, (apply_tensor_parallel, vocab_parallel_loss), **pipeline)
    if layout == "ddp":
        # no buffer broadcasts: the rotary tables are constants, and MoE routing biases are updated identically on
        # every rank from all-reduced loads (while their load counters are each rank's own). The gradients are views
        # into DDP's all-reduce buckets, not a second copy of them
        DDP._set_params_and_buffers_to_ignore_for_model(model, list(experts))
        return Layout(DDP(model, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None,
                          broadcast_buffers=False, gradient_as_bucket_view=True), model, layout)
    if "tp" in layout:
        apply_tensor_parallel(model, mesh["tp"])
    if fsdp:
        kw = dict(mesh=mesh["dp"], ignored_params=set(experts.values()), **fsdp)
        # a DRE's core blocks run r times a step: a unit of their own would be gathered at each run, forward and
        # backward. Left to the root's unit, they are gathered with it, once in forward and once in backward, and
        # their gradients reduce-scattered once (docs/parallel.md)
        depth = model.depth if model.config.dre else None
        core = range(depth.n_prelude, depth.n_prelude + depth.n_core) if depth else ()
        for i, block in enumerate(model.transformer.h):
            if i not in core:
                fully_shard(block, **kw)
        if depth:  # the kl exit test runs the coda after each core step: its gathers must pair up across ranks
            depth.exit_group = mesh["dp"].get_group()
        fully_shard(model, **kw)  # the rest: embeddings, final norm, head, a DRE's core
    return Layout(model, model, layout)


class Layout(nn.Module):
    """A model as the layouts here wrap it (none, ddp, fsdp, tp and their mixes), answering the training step's
    calls as pipeline.Pipeline does: forward (a micro-batch's loss), backward, moe_loss, no_sync, finish_backward
    and clip_grad_norm_. train.py's step is then one piece of code for every layout."""

    def __init__(self, wrapped, model, layout):
        super().__init__()
        self.wrapped, self.layout = wrapped, layout
        self.model = [model]  # the unwrapped model (in a list: its parameters are the wrapped one's)
        # DDP's gradients are views into its all-reduce buckets: zeroed in place after a step, not freed (the next
        # backward would allocate a second copy beside the buckets)
        self.grads_in_buckets = layout == "ddp"

    def forward(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def backward(self, loss):
        loss.backward()

    def moe_loss(self):
        return self.model[0].moe_loss()

    def no_sync(self, sync):
        """Gradient accumulation: reduce gradients across data-parallel ranks on the last micro-step only."""
        if self.layout == "ddp":
            self.wrapped.require_backward_grad_sync = sync
        elif "fsdp" in self.layout:
            self.wrapped.set_requires_gradient_sync(sync)

    def finish_backward(self):
        pass  # (a pipeline sums a tied embedding's gradient over its two stages here)

    def clip_grad_norm_(self, max_norm):
        return clip_grad_norm_(list(self.parameters()), max_norm)


def compile_blocks(model, **compile_kwargs):
    """torch.compile block by block, as torchtitan does, rather than the whole model: alike blocks share one
    compilation, so compile time does not grow with depth. Each block's forward is compiled, not the module:
    parameter names stay as they are, and the hooks that layouts put around a block (FSDP's gathers) stay outside
    the graph. Compiling happens at the first call, after the layout is applied."""
    for block in model.transformer.h:
        block.forward = torch.compile(block.forward, **compile_kwargs)
    return model


def apply_tensor_parallel(model, tp_mesh):
    """The Megatron plan, declared per module. Between blocks the residual stream is a (B, T/tp, C) slice of the
    sequence; attention and MLPs gather it, work on their share of heads / hidden units, and reduce-scatter back.
    The embedding and the head are split by vocabulary too, so that no rank holds full-vocabulary logits: they come
    out as a DTensor split along the vocabulary, which the loss takes through vocab_parallel_loss (model.py's, a
    pipeline's). A tied embedding and head are one matrix split by rows (vocabulary) under both plans: it stays one
    parameter. `model` may be a pipeline stage, holding some of these modules only."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                                   RowwiseParallel, SequenceParallel, parallelize_module)
    # the embedding's partial sums reduce-scattered straight to this rank's part of the sequence; the head gathers
    # the sequence and computes its share of the vocabulary's logits
    top = {
        "transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "transformer.ln_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }
    names = dict(model.named_modules())
    parallelize_module(model, tp_mesh, {k: v for k, v in top.items() if k in names})
    if {"lm_head", "transformer.wte"} <= names.keys() and model.config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # each plan made its own copy of the matrix: tie again
    gather_seq = dict(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    group = tp_mesh.get_group()
    for block in model.transformer.h.children():
        plan = {
            "ln_1": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None)),
            "attn.c_q": ColwiseParallel(), "attn.c_k": ColwiseParallel(), "attn.c_v": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(output_layouts=Shard(1)),
            "ln_2": SequenceParallel(),
        }
        if isinstance(block.mlp, MoE):
            # experts are split by hidden units like a dense MLP; the router is whole on every rank. The experts'
            # partial outputs are summed over the group (ExpertsTP) before the router's weights apply
            plan["mlp"] = PrepareModuleInputOutput(**gather_seq, use_local_input=True, output_layouts=(Replicate(),),
                                                   desired_output_layouts=(Shard(1),))
            if block.mlp.shared is not None:
                plan.update({"mlp.shared.c_gate": ColwiseParallel(), "mlp.shared.c_fc": ColwiseParallel(),
                             "mlp.shared.c_proj": RowwiseParallel()})
            moe = block.mlp
            for name, placement in (("w13", Shard(2)), ("w2", Shard(2))):  # (E, 2, hidden, in), (E, out, hidden)
                setattr(moe, name, nn.Parameter(distribute_tensor(getattr(moe, name).data, tp_mesh, [placement])))
            moe.router.weight = nn.Parameter(distribute_tensor(moe.router.weight.data, tp_mesh, [Replicate()]))
            moe.enter_experts, moe.leave_experts = ExpertsTP(group, sum_output=False), ExpertsTP(group, sum_output=True)
        else:
            plan.update({"mlp": PrepareModuleInput(**gather_seq),
                         "mlp.c_gate": ColwiseParallel(), "mlp.c_fc": ColwiseParallel(),
                         "mlp.c_proj": RowwiseParallel(output_layouts=Shard(1))})
        parallelize_module(block, tp_mesh, plan)
        if block.attn.q_norm is not None:
            # QK-norm's gains are shared by all heads, and each rank sees only its own heads: sum their gradients
            for p in (block.attn.q_norm.weight, block.attn.k_norm.weight):
                p.register_hook(lambda grad, group=group: _all_reduced(grad, group))


def _all_reduced(t, group):
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


class _MegatronFG(torch.autograd.Function):
    """Megatron's f (identity forward, the gradient summed over the group) and g (the output summed, the gradient
    passed through), chosen by sum_output."""

    @staticmethod
    def forward(ctx, x, group, sum_output):
        ctx.group, ctx.sum_output = group, sum_output
        return _all_reduced(x, group) if sum_output else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.sum_output else _all_reduced(grad, ctx.group)), None, None


class ExpertsTP(nn.Module):
    """What moe.MoE runs before (f) and after (g) its experts under tensor parallelism: each rank holds a slice of
    every expert's hidden units, so the experts' input gradient and their outputs are partial sums over the group."""

    def __init__(self, group, sum_output):
        super().__init__()
        self.group, self.sum_output = group, sum_output

    def forward(self, x):
        return _MegatronFG.apply(x, self.group, self.sum_output)


def optimizer_kwargs(model, device_type):
    """Fused optimizer kernels take one kind of tensor: where some parameters are DTensors and others plain tensors
    (QK-norm's gains under tp), those runs step parameter by parameter."""
    kinds = {hasattr(p, "device_mesh") for p in model.parameters()}
    return {"foreach": False} if len(kinds) == 2 else {"fused": device_type in ("cuda", "cpu")}


def vocab_parallel_loss(logits, targets, reduction="mean"):
    """The cross-entropy (ignoring targets of -1) of (B, T, vocab) logits split along the vocabulary over the
    tensor-parallel ranks (a DTensor), through loss_parallel: each rank's log-softmax takes the max and the sum of
    exponentials over the group, so no rank gathers the full-vocabulary logits. A plain tensor, the same on every
    rank: the mean, or with reduction='none' one value per token (B*T,)."""
    from torch.distributed.tensor.parallel import loss_parallel
    if torch.is_grad_enabled() and logits.requires_grad:
        return _LossParallel.apply(logits, targets, reduction)
    with loss_parallel():
        return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction).to_local()


class _LossParallel(torch.autograd.Function):
    """loss_parallel's cross-entropy as one autograd node whose backward runs under loss_parallel too (its
    backward ops exist only there), wherever and by whomever loss.backward() is called."""

    @staticmethod
    def forward(ctx, logits, targets, reduction):
        from torch.distributed.tensor.parallel import loss_parallel
        with torch.enable_grad(), loss_parallel():
            ctx.logits = logits.detach().requires_grad_()
            ctx.loss = F.cross_entropy(ctx.logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1,
                                       reduction=reduction)
        return ctx.loss.detach().to_local()

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.parallel import loss_parallel
        with loss_parallel():
            grad = DTensor.from_local(grad, ctx.loss.device_mesh, ctx.loss.placements, run_check=False)
            (grad,) = torch.autograd.grad(ctx.loss, ctx.logits, grad)
        del ctx.logits, ctx.loss
        return grad, None, None


def agree(stop_requested, nonfinite, device):
    """Every rank's view of (a stop was requested anywhere, a loss was non-finite anywhere): all ranks must stop
    together, or the others would hang in their next collective. One all-reduce, and a host sync: call it at log
    and evaluation intervals only."""
    flags = torch.stack([torch.tensor(float(stop_requested), device=device), nonfinite.float()])
    if dist.is_initialized():
        dist.all_reduce(flags)
    stop, bad = (flags > 0).tolist()  # one read of both
    return stop, bad


def clip_grad_norm_(params, max_norm):
    """torch.nn.utils.clip_grad_norm_, also when gradients are DTensors on different meshes (a pipeline stage under
    fsdp+tp: the blocks' on (dp, tp), embeddings on dp). Each rank sums the squares of its own shards, mesh by mesh (a
    shard held by several ranks counted once), and one all-reduce per mesh dimension completes each mesh's sum: a few
    scalar collectives per step, not one per parameter."""
    params = [p for p in params if p.grad is not None]
    if not any(hasattr(p.grad, "device_mesh") for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    from torch.distributed.tensor import DTensor, Partial
    sum_partial_grads(params)
    whole, per_mesh = [], {}  # plain tensors are whole (and the same) on every rank
    for g in (p.grad for p in params):
        if isinstance(g, DTensor):
            mesh, local = g.device_mesh, torch.linalg.vector_norm(g.to_local(), dtype=torch.float32) ** 2
            copies = math.prod(mesh.size(d) for d, q in enumerate(g.placements) if q.is_replicate())
            per_mesh.setdefault(mesh, []).append(local / copies)
        else:
            whole.append(torch.linalg.vector_norm(g, dtype=torch.float32) ** 2)
    total = sum(whole) + sum(DTensor.from_local(torch.stack(sq).sum(), mesh, [Partial()] * mesh.ndim).full_tensor()
                             for mesh, sq in per_mesh.items())
    total = total.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef)
    return total


def sum_partial_grads(params):
    """Tensor parallelism leaves the gradients of weights that every rank holds whole (the sequence-parallel
    norms') as partial sums over the group. Sums them, those of each mesh and placement in one all-reduce, and
    keeps the sums as the gradients: a norm cannot be taken of partial sums, and the optimizer would otherwise
    reduce each again at every use."""
    from torch.distributed._functional_collectives import all_reduce
    from torch.distributed.tensor import DTensor, Replicate
    groups = {}
    for p in params:
        if isinstance(p.grad, DTensor) and any(q.is_partial() for q in p.grad.placements):
            groups.setdefault((p.grad.device_mesh, tuple(p.grad.placements)), []).append(p)
    for (mesh, placements), group in groups.items():
        flat = torch.cat([p.grad.to_local().flatten() for p in group])
        for dim, q in enumerate(placements):
            if q.is_partial():
                flat = all_reduce(flat, q.reduce_op, (mesh, dim))
        summed = [Replicate() if q.is_partial() else q for q in placements]
        for p, piece in zip(group, flat.split([p.grad.to_local().numel() for p in group])):
            p.grad = DTensor.from_local(piece.view_as(p.grad.to_local()), mesh, summed, shape=p.grad.shape,
                                        stride=p.grad.stride())


