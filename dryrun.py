"""
The dry run: rank 0's view of an N-rank job, on this CPU, without the memory (`python train.py CONFIG --dry_run=N`).
A fake process group stands for the other ranks (its collectives move nothing), the model is built on `meta`, laid
out exactly as train.py lays it out (parallel.parallelize), then two real training steps (forward, backward,
clipping, optimizer) run under fake tensors, which have shapes, dtypes and devices but no storage. PyTorch's memory
tracker (FSDPMemTracker under fsdp, MemTracker otherwise) counts what every tensor would take, by category; a FLOP
counter and a collective counter watch the second step. The figures are those of a GPU run (bf16 autocast, fp32
master weights and AdamW state), computed on "cpu" fake tensors.

A module of its own rather than part of parallel.py: it is a tool that drives the layouts from outside (fake world,
trackers, the report and its advice), not a layout, and parallel.py is at its size limit.
"""

import gc
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from unittest.mock import patch

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

GiB = 2**30
# what travels, per collective: (op name fragment, label). c10d ops are what process groups run (FSDP, DDP, EP);
# _c10d_functional ones what DTensor and the functional collectives run (TP, loss and clipping reductions)
COLLECTIVES = {"allgather": "all_gather", "all_gather": "all_gather", "reduce_scatter": "reduce_scatter",
               "allreduce": "all_reduce", "all_reduce": "all_reduce", "alltoall": "all_to_all",
               "all_to_all": "all_to_all", "broadcast": "broadcast", "send": "send/recv", "recv": "send/recv"}


class StepCounter(TorchDispatchMode):
    """Counts what a rank computes and sends: matmul FLOPs (torch.utils.flop_counter's formulas, plus MoE's grouped
    GEMM, which it lacks), and the collectives, calls and bytes each puts in (this rank's input), by kind. It sees
    each rank's local ops: a DTensor op is let through to unwrap first."""

    def __init__(self):
        super().__init__()
        self.flops, self.calls, self.bytes = 0, {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet is torch.ops.aten._grouped_mm:  # each row of a meets one expert's (K, N) matrix
            self.flops += 2 * args[0].numel() * args[1].shape[-1]
        elif packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:  # (the GPUs' kernels it has)
            self.flops += sdpa_flop_count(*(t.shape for t in args[:3]))
        elif packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            self.flops += sdpa_backward_flop_count(*(t.shape for t in args[:4]))
        elif packet in flop_registry:
            self.flops += flop_registry[packet](*args, **(kwargs or {}), out_val=out)
        elif func.namespace in ("c10d", "_c10d_functional", "_c10d_functional_autograd"):
            label = next((v for k, v in COLLECTIVES.items() if k in func.__name__), None)
            tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
                       if isinstance(t, torch.Tensor)]
            if label and tensors:
                # c10d's all_gather and reduce_scatter take (output, input): the input is what this rank puts in
                put = tensors[-1] if func.namespace == "c10d" and label in ("all_gather", "reduce_scatter") \
                    else tensors[0]
                self.calls[label] = self.calls.get(label, 0) + 1
                self.bytes[label] = self.bytes.get(label, 0) + put.nbytes
        return out


class CollectCycles(TorchDispatchMode):
    """Frees reference cycles every `every` ops, before the op runs. Fake tensors' dispatch leaves cycles (frames of
    caught exceptions among them) that hold tensors an eager run frees at once; left to the collector's own
    schedule they would count as memory for as long as it lets them live, a different figure each run."""

    def __init__(self, every=1000):
        super().__init__()
        self.every, self.n = every, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        if self.n % self.every == 0:
            gc.collect()
        return func(*args, **(kwargs or {}))


def fake_world(world_size, rank=0):
    """This rank of a world of world_size ranks whose collectives do nothing (torch's fake process group)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())


def tracker_for(model, optimizer):
    """FSDP's own tracker under fsdp (it tells sharded from gathered weights and the collective buffers), else the
    general one; either keeping only the whole rank's peak, and taking the model's forward again as a new pass."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    class Local:
        def _pre_fw_hook(self, module, inputs):  # the model run again (micro-steps, a pipeline's pieces): as anew
            name = self._mod_tracker.get_known_fqn(module)
            if module in self.memory_tracking and not self._mod_tracker.is_bw and \
                    set(self._mod_tracker.parents) - {name} == {"Global"}:
                self.reset_mod_stats()  # (module-by-module figures, which the report leaves out)
            return super()._pre_fw_hook(module, inputs)

        # a pipeline's schedule runs backward inside the model's forward: a module whose figures were reset
        # above leaves no trace to update (the whole rank's figures, which the report gives, are kept apart)
        def _post_fw_hook(self, module, *args):
            if module in self.memory_tracking:
                super()._post_fw_hook(module, *args)

        def _pre_bw_hook(self, module, *args):
            if module in self.memory_tracking:
                super()._pre_bw_hook(module, *args)

        def _post_bw_hook(self, module, *args):
            if module in self.memory_tracking:
                super()._post_bw_hook(module, *args)

        def _update_peak_stats(self, peak_state):  # the whole rank's peak only: each module's (not reported here)
            for dev, snap in self._curr_mem_snap.items():  # would cost a pass over all modules at every op
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], dict(snap)

    if isinstance(model, FSDPModule):
        return type("Tracker", (Local, FSDPMemTracker), {})(model, optimizer)
    tracker = type("Tracker", (Local, MemTracker), {})()
    tracker.track_external(model, optimizer)
    return tracker


# the tracker's categories, folded into the report's
CATEGORIES = {"Parameter": "parameters", "Sharded Param": "parameters", "Unsharded Param": "gathered params",
              "Buffer": "buffers", "Gradient": "gradients", "Sharded Grad": "gradients",
              "Unsharded Grad": "gathered grads", "Optstate": "optimizer", "OptState": "optimizer",
              "Activation": "activations", "Temp": "temporaries", "All Gather": "collective buffers",
              "Reduce Scatter": "collective buffers", "Inputs": "inputs", "Other": "other"}


def peak_by_category(tracker):
    """{category: bytes} at the moment of peak total, and that total (every device the tensors were on)."""
    out = {}
    for snap in tracker.get_tracker_snapshot("peak").values():
        for key, value in snap.items():
            if key != "Total" and value:
                name = CATEGORIES.get(key, key)
                out[name] = out.get(name, 0) + value
    return out, sum(out.values())


def lenient_pop(tracker, w_mod, name, is_bw):
    """ModTracker's exit from a module, without its check of proper nesting (torch 2.13's own, minus the raise)."""
    def pop(*args):
        if tracker._user_post_bw_hook is not None and is_bw:
            tracker._user_post_bw_hook(w_mod(), args)
        if name in tracker.parents:
            tracker._active_module_cnt[name] -= 1
            if tracker._active_module_cnt[name] == 0:
                tracker.parents.remove(name)
    return pop


def static_stages(schedule, stages, *_):
    """What pipelining's warm-up vote decides when every stage is given its input and output shapes, as
    pipeline.py gives them: no exchange of shapes."""
    from torch.distributed.pipelining.stage import InferenceMode
    for stage in stages:
        stage._inference_mode = InferenceMode.STATIC


def train_steps(wrapped, raw_model, optimizers, batches, micro_steps, grad_clip, autocast, sync_expert_grads,
                count=None):
    """train.py's optimizer step, once per batch: micro_steps forwards and backwards (gradients synchronised on the
    last), the experts' gradients, clipping, the optimizer. count(step, micro) gives a context each micro-step
    runs in (the last one's also holds clipping and the optimizer)."""
    for step, batch in enumerate(batches):
        for micro in range(micro_steps):
            last = micro == micro_steps - 1
            with count(step, micro) if count else nullcontext():
                wrapped.no_sync(sync=last)
                with autocast:
                    _, loss = wrapped(*batch)
                    loss = loss / micro_steps + wrapped.moe_loss() / micro_steps
                wrapped.backward(loss)
                if last:
                    sync_expert_grads(raw_model)
                    wrapped.finish_backward()
                    if grad_clip:
                        wrapped.clip_grad_norm_(grad_clip)
                    for opt in optimizers:
                        opt.step()
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=not wrapped.grads_in_buckets)


def measure(model_args, s, world_size, fake=True):
    """Two training steps of the model model_args describes under the layout the settings `s` (train.py's) name,
    as rank 0 of world_size ranks sees them. fake=True: in a fake world under fake tensors (the dry run); False: in
    the process group already joined, for real (what the dry run is checked against). Returns a dict: 'peak'
    {category: bytes}, 'total', 'flops' of a step, 'collectives' {kind: (calls, bytes)} of a step, 'seconds'."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import hardware
    from model import GPT, GPTConfig, empty_keeping_ties
    from moe import sync_expert_grads
    from parallel import Layout, check_layout, mesh_and_ranks, optimizer_kwargs, parallelize
    t0 = time.perf_counter()
    # a DRE runs its most core steps every step: the largest memory (the draw of r is host-side Python on a tensor)
    config = GPTConfig(**{**model_args, "dre_sample_steps": False})
    layout, tp_size, pp_size, ep_size = s["parallel"], s["tp_size"], s["pp_size"], s["ep_size"]
    if layout == "auto":
        layout = "ddp" if world_size > pp_size else "none"
    microbatches = s["pp_microbatches"] or pp_size
    dtype = "bfloat16" if s["dtype"] == "auto" else s["dtype"]
    check_layout(layout, tp_size, world_size, config, s["batch_size"], s["block_size"],
                 s["gradient_accumulation_steps"], s["optimizer"], dtype, ep_size, pp_size, s["pp_schedule"],
                 microbatches, s["pp_virtual_stages"])
    mesh, _, dp_size = mesh_and_ranks(layout, tp_size, world_size, "cpu", pp_size)
    accumulation, batch_size = s["gradient_accumulation_steps"], s["batch_size"]
    if accumulation % dp_size == 0:
        accumulation //= dp_size
    else:
        batch_size //= dp_size
    # the layout is applied outside the fake mode (a mesh's coordinates come from `nonzero`, which fake tensors
    # refuse), to a model on `meta`; to_empty then gives it fake storage
    with torch.device("meta") if fake else nullcontext():
        torch.manual_seed(s["seed"])
        model = GPT(config)
    # as on a GPU: fsdp computes in bf16 from fp32 shards (train.py's param_dtype); fused AdamW
    param_dtype = hardware.DTYPES[dtype] if "fsdp" in layout and dtype != "float32" else None
    pipeline = dict(schedule=s["pp_schedule"], microbatches=microbatches, virtual=s["pp_virtual_stages"],
                    accumulation=accumulation, batch=batch_size, seq_len=s["block_size"]) if pp_size > 1 else None
    bare_ddp = fake and layout == "ddp" and ep_size == 1  # DDP reads its parameters as it wraps them: the model
    if bare_ddp and not pipeline:                       # (a pipeline's stages) goes bare, its all-reduce counted below
        wrapped = Layout(model, model, "none")
        wrapped.grads_in_buckets = True  # as DDP's own: its gradients stay between steps, as its buckets do
    else:
        with patch("pipeline.DDP", lambda module, **_: module) if bare_ddp else nullcontext():
            wrapped = parallelize(model, layout, mesh, "cpu", param_dtype, s["fsdp_reshard_after_forward"], False,
                                  ep_size, pipeline)
    stack = ExitStack()
    if fake:
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        # DTensor works out its outputs' global shapes on fake tensors of the fake mode it finds active, ours here:
        # the tracker would count those as memory. Give it a mode of its own, as it has outside a dry run
        own = FakeTensorMode(allow_non_fake_inputs=True)
        stack.enter_context(patch("torch.distributed.tensor._sharding_prop.detect_fake_mode", lambda *_: own))
    if pipeline:  # the schedule interleaves forward and backward, which the tracker's module nesting check refuses
        stack.enter_context(patch("torch.distributed._tools.mod_tracker.ModTracker._get_pop_fn", lenient_pop))
        if fake:  # the stages vote on how to learn their shapes by reading a tensor; they are given their shapes
            stack.enter_context(patch("torch.distributed.pipelining.schedules._PipelineSchedule._warmup_p2p",
                                      static_stages))
    # a real run is measured under the same collection regime, so that the two are alike
    stack.enter_context(CollectCycles())
    stack.callback(gc.enable)
    gc.disable()  # (CollectCycles collects instead, at set points)
    gc.collect()
    gc.freeze()  # what exists now is never garbage: each collection looks at the step's objects only
    stack.callback(gc.unfreeze)
    with stack:
        if fake:
            empty_keeping_ties(wrapped, "cpu")  # (a pipeline's stages hold buffers of their own)
        optimizers = model.configure_optimizers(s["weight_decay"], s["learning_rate"], (s["beta1"], s["beta2"]),
                                                "cpu", s["optimizer"], optimizer_kwargs(model, "cuda"))
        g = torch.Generator().manual_seed(s["seed"])
        batches = []
        for _ in range(2):
            x = torch.randint(config.vocab_size, (batch_size, s["block_size"] + 1), generator=g)
            batches.append((x[:, :-1], x[:, 1:]))
        tracker = tracker_for(model, optimizers[0])
        micro_steps = min(accumulation, 2)  # the second one shows what accumulating gradients holds
        # the second step's FLOPs and collectives, a non-synchronising micro-step's apart from the last one's
        counters = [StepCounter() for _ in range(micro_steps)]

        def count(step, micro):
            return counters[micro] if step == 1 else nullcontext()

        with tracker:
            train_steps(wrapped, model, optimizers, batches, micro_steps, s["grad_clip"],
                        hardware.autocast("cpu", dtype), sync_expert_grads, count)
    peak, total = peak_by_category(tracker)
    weights = [accumulation - 1, 1] if micro_steps == 2 else [1]  # a step: accumulation - 1 quiet micro-steps
    flops = sum(w * c.flops for w, c in zip(weights, counters))
    collectives = {}
    for w, c in zip(weights, counters):
        for kind in c.calls:
            calls, size = collectives.get(kind, (0, 0))
            collectives[kind] = (calls + w * c.calls[kind], size + w * c.bytes[kind])
    if bare_ddp:
        # DDP's buckets, all-reduced once a step: the gradients themselves (gradient_as_bucket_view), no second copy
        buckets = sum(4 * p.numel() for p in model.parameters() if p.requires_grad)
        calls, size = collectives.get("all_reduce", (0, 0))
        collectives["all_reduce"] = (calls + math.ceil(buckets / (25 * 2**20)), size + buckets)
    return {"peak": peak, "total": total, "flops": flops, "collectives": collectives, "layout": layout,
            "accumulation": accumulation, "batch_size": batch_size, "dp_size": dp_size,
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - t0}


ORDER = ("parameters", "gathered params", "gradients", "gathered grads", "optimizer", "activations", "temporaries",
         "collective buffers", "buffers", "inputs", "other")


def describe(r, s, world_size):
    """The dry run's report, as lines."""
    where = f"parallel={r['layout']}" + "".join(f", {k}={s[k]}" for k in ("tp_size", "pp_size", "ep_size")
                                                  if s[k] > 1)
    lines = [f"dry run: rank {r.get('rank', 0)} of {world_size}, {where}, {r['dp_size']} data-parallel; micro-batch "
             f"{r['batch_size']} x {s['block_size']}, {r['accumulation']} micro-step{'s' * (r['accumulation'] > 1)} "
             f"a step; {'bfloat16' if s['dtype'] == 'auto' else s['dtype']} compute, fp32 weights, {s['optimizer']}"
             f"{', grad_checkpoint' * bool(s['grad_checkpoint'])} ({r['seconds']:.1f} s on this CPU)",
             "per-rank memory at its peak, GiB:"]
    for name in sorted(r["peak"], key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER)):
        lines.append(f"  {name:<20} {r['peak'][name] / GiB:>8.2f}")
    lines.append(f"  {'total':<20} {r['total'] / GiB:>8.2f}")
    lines.append(f"FLOPs per step on this rank: {r['flops'] / 1e12:,.1f} TFLOP (counted op by op)")
    moved = ", ".join(f"{k} {calls:,.0f} calls {size / GiB:,.2f} GiB" for k, (calls, size) in
                      sorted(r["collectives"].items()))
    lines.append(f"collectives per step, this rank's input: {moved or 'none'}")
    if s["pp_size"] > 1:
        lines.append("note: pipeline: the larger of the first and the last stage is shown (" + ", ".join(
            f"rank {x['rank']} {x['total'] / GiB:.2f} GiB" for x in r["stages"]) + "); as forward and backward "
            "interleave, the split between activations and temporaries is approximate (the total is not)")
        # the fill and drain of each micro-step's pipeline, in piece times: (p - 1) / v of them (Megatron-LM)
        p, v = s["pp_size"], s["pp_virtual_stages"]
        m, idle = s["pp_microbatches"] or p, (p - 1) / v
        lines.append(f"pipeline bubble: {s['pp_schedule']}, {p} stages{f' x {v} virtual' * (v > 1)}, {m} pieces: "
                     f"{idle:g} / ({m} + {idle:g}) = {idle / (m + idle):.1%} of each micro-step idle")
    # what the dry run leaves out, said rather than skipped
    for left_out, why in ((s.get("compile"), "compile=True: not dry-run (eager figures; compiled blocks may hold "
                                              "less)"),
                          (s.get("fsdp_cpu_offload"), "fsdp_cpu_offload=True: not dry-run (figures without it)"),
                          (s.get("mode") == "dpo", "mode='dpo': its frozen reference model is not included"),
                          (s.get("dre") and s.get("dre_sample_steps"), "dre: each step runs max_reasoning_steps core "
                                                                       "steps (the most memory; FLOPs at that r)")):
        if left_out:
            lines.append(f"note: {why}")
    return lines


def candidates(s, world_size):
    """Settings that lower per-rank memory, in the order to try them: each {key: value} on top of s."""
    out = []
    if not s["grad_checkpoint"]:
        out.append({"grad_checkpoint": True})
    if s["parallel"] in ("auto", "ddp", "none") and s["ep_size"] == 1 and world_size > s["pp_size"]:
        out.append({"parallel": "fsdp"})
    if s["batch_size"] > 1:
        b = s["batch_size"] // 2
        out.append({"batch_size": b, "gradient_accumulation_steps": s["gradient_accumulation_steps"] * 2})
    for tp in (2, 4, 8):
        if tp > s["tp_size"] and world_size % (tp * s["pp_size"]) == 0 and world_size > tp * s["pp_size"] \
                and s["ep_size"] == 1:
            out.append({"parallel": "fsdp+tp", "tp_size": tp})
            break
    return out


def cannot(s):
    """Why the dry run cannot rehearse these settings, or None: what fake tensors or the tracker do not support."""
    if s["ep_size"] > 1:
        return ("expert parallelism (ep_size > 1): the all_to_all's split sizes are read on the host (.tolist()), "
                "and fake tensors hold no values")
    return None


def worst_rank(model_args, s, world_size):
    """measure() on rank 0, and for a pipeline on the last rank too (the first stage holds the embedding, the last
    the head and the loss): the larger, with the figures of each as 'stages'. A pipeline's ranks are measured each
    in a forked child: torch keeps process-group names from one fake world to the next, and other ranks' differ."""
    if s["pp_size"] == 1:
        fake_world(world_size)
        return {**measure(model_args, s, world_size), "rank": 0, "stages": []}

    def on(rank):
        fake_world(world_size, rank)
        return {**measure(model_args, s, world_size), "rank": rank}
    results = [in_child(lambda: on(0)), in_child(lambda: on(world_size - 1))]
    return {**max(results, key=lambda r: r["total"]), "stages": results}


def in_child(fn):
    """fn() run in a forked copy of this process: its result, or its exception raised here."""
    import pickle
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its answer down the pipe, then gone without running anything of the parent's
        try:
            out = pickle.dumps((True, fn()))
        except BaseException as e:  # noqa: B902 (handed to the parent)
            out = pickle.dumps((False, e if isinstance(e, (RuntimeError, ValueError, NotImplementedError)) else
                                RuntimeError(f"{type(e).__name__}: {e}")))
        with os.fdopen(write, "wb") as f:
            f.write(out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        ok, value = pickle.loads(f.read())
    os.waitpid(pid, 0)
    if not ok:
        raise value
    return value


def run(s, model_args, world_size, gpu_memory, say=print):
    """The dry run of train.py's settings `s` and model model_args on world_size ranks: prints the report and a
    last line, fits or does not fit gpu_memory GiB (and what would). Returns 0 if it fits, else 1."""
    if cannot(s):
        raise ValueError(f"dry_run: {cannot(s)}")
    try:
        try:
            r = worst_rank(model_args, s, world_size)
        except (RuntimeError, NotImplementedError) as e:  # an op fake tensors cannot run: named, in one line
            raise ValueError(f"dry_run: these settings do not run under fake tensors: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        for line in describe(r, s, world_size):
            say(line)
        limit = gpu_memory * GiB
        if r["total"] <= limit:
            say(f"fits: {r['total'] / GiB:.1f} GiB of {gpu_memory:g} GiB per GPU")
            return 0
        tried = []
        for change in candidates(s, world_size):  # the first that fits, its figure a dry run too
            changed = {**s, **change}
            try:
                other = worst_rank({**model_args, **{k: v for k, v in change.items() if k in model_args}}, changed,
                                   world_size)
            except ValueError:
                continue  # a layout these sizes do not divide
            finally:
                gc.collect()
            flags = " ".join(f"--{k}={v}" for k, v in change.items())
            tried.append(f"{flags}: {other['total'] / GiB:.1f} GiB")
            if other["total"] <= limit:
                say(f"does not fit: {r['total'] / GiB:.1f} GiB per GPU, {gpu_memory:g} GiB available; it fits "
                    f"with {flags} ({other['total'] / GiB:.1f} GiB)")
                return 1
        say(f"does not fit: {r['total'] / GiB:.1f} GiB per GPU, {gpu_memory:g} GiB available; and neither with "
            f"{'; '.join(tried) or 'any single change tried'}: use more GPUs or a smaller model")
        return 1
    finally:
        if dist.is_initialized():  # (a pipeline's ranks are measured in children)
            dist.destroy_process_group()


def host_memory():
    """Bytes of host memory available now (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def start_check(model_args, s, world_size, device_type, local_ranks):
    """An `error:` message when a real start cannot fit, else None: found before anything is allocated, from
    what no run can do without. On the device, fp32 weights, gradients and AdamW's two moments (16 bytes a
    parameter) over as many shards as the layout makes; on the host, every rank of the node building the whole model
    in fp32 first (4 bytes a parameter) unless it starts on `meta` (s['on_meta'], train.py's), and on a CPU the 16
    bytes too. A lower bound (no activations): what it refuses cannot run; what it lets through, the dry run
    measures."""
    from model import GPT, GPTConfig
    with torch.device("meta"):
        n = GPT(GPTConfig(**model_args)).num_params(non_embedding=False)
    layout = s["parallel"]
    tp = s["tp_size"] if "tp" in layout else 1
    dp = world_size // tp // s["pp_size"]
    shards = tp * s["pp_size"] * (dp if "fsdp" in layout else s["ep_size"])
    state = f"fp32 weights, gradients and AdamW state over {shards} shard{'s' * (shards > 1)}"
    checks = []
    if device_type == "cuda":
        checks.append((16 * n / shards, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory,
                       "GPU memory", state))
    host = host_memory()
    whole = 0 if s.get("on_meta") else 4 * n
    on_host = [whole] * bool(whole) + [16 * n / shards] * (device_type != "cuda")
    if host and on_host:
        ranks = f"available host memory shared by {local_ranks} rank{'s' * (local_ranks > 1)}"
        what = [state] * (device_type != "cuda") + ["each rank first builds the whole model in fp32"] * bool(whole)
        checks.append((max(on_host), host / local_ranks, ranks, ", and ".join(what)))
    for need, have, where, what in checks:
        if need > have:
            dry = " ".join(a for a in sys.argv[1:] if not a.startswith("--dry_run=")) + f" --dry_run={world_size}"
            return (f"error: this run needs at least {need / GiB:.1f} GiB per rank ({n / 1e9:.2f}B parameters: "
                    f"{what}) but has {have / GiB:.1f} GiB ({where}). Use a smaller model, more ranks or machines, "
                    f"or parallel='fsdp'; `python train.py {dry}` rehearses it without the memory")
    return None


def refuse_what_cannot_fit(model_args, s, world_size, device_type, master):
    """train.py's start: start_check's message, printed once for the job (rank 0), and every rank's exit."""
    from parallel import exit_process
    if message := start_check(model_args, s, world_size, device_type, int(os.environ.get("LOCAL_WORLD_SIZE", 1))):
        if master:
            print(message)
        exit_process(1)
