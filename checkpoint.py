"""
Checkpoints: what a run leaves in its out_dir and how the next one reads it back.
- ckpt.pt, one file (torch.save): weights, optimizer states, every rank's random streams, the run's settings.
  Written atomically (write_checkpoint), read memory-mapped (read_checkpoint), its failures told apart.
- ckpt_dcp/, a distributed checkpoint (torch.distributed.checkpoint), which sharded layouts write: every rank its
  own shards, resharded on load, so a run saved on 8 ranks resumes on 1 or 16.
Of the two, the later by iteration is the run's checkpoint (newest); convert.load_run reads either for sample.py,
serve.py and the rest, and `python convert.py OUT_DIR --ckpt` turns a distributed one into a ckpt.pt to copy.
Every checkpoint holds the run's tokenizer (data.Tokenizer.spec), so a run never falls back to another one.
"""

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from model import GPTConfig

CHECKPOINT_VERSION = 1  # ckpt.pt's layout; raise it when a change makes old checkpoints unreadable
DCP_DIR = "ckpt_dcp"  # inside out_dir
# model settings a run may change when it resumes or fine-tunes (none changes a weight's shape; the DRE's steps let
# a curriculum stage draw r differently from the run it starts from); every other one comes from the checkpoint
RUN_SETTINGS = ("dropout", "grad_checkpoint", "capacity_factor", "eval_capacity_factor", "moe_kernel", "aux_loss_coef",
                "z_loss_coef", "dre_threshold", "dre_exit", "max_reasoning_steps", "dre_sample_steps", "dre_mean_steps",
                "dre_backprop_steps", "dre_progressive")

# train.py settings of where and how a run runs, not of what it computes: a resumed run takes them from its own
# command line (it may resume on another layout or world size), the others from its checkpoint (saved_config)
MACHINE_SETTINGS = ("init_from", "out_dir", "overwrite", "device", "compile", "backend", "parallel", "tp_size",
                    "ep_size", "pp_size", "pp_schedule", "pp_microbatches", "pp_virtual_stages",
                    "fsdp_reshard_after_forward", "fsdp_cpu_offload", "peak_flops")


def _flat():
    """Optimizer state keyed by parameter name, param groups too: pipeline stages' groups of the same index hold
    different parameters, and group-indexed keys would collide (torchtitan saves it this way for the same reason)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(ValueError):
    """A file that is not a checkpoint this code can read; the message says which of the usual reasons it is."""


def newest(out_dir):
    """('dcp', dir) or ('file', ckpt.pt) for the later of a run's two checkpoints by iteration, or (None, None). At
    the same iteration the distributed one wins: a ckpt.pt beside it is its weights-only copy (convert.py --ckpt).
    Iterations, not file times: a copy that does not keep times, or a conversion, must not flip the answer."""
    path, dcp = os.path.join(out_dir, "ckpt.pt"), find_sharded(out_dir)
    if dcp and not (os.path.exists(path) and read_checkpoint(path)["iter_num"] > read_meta(dcp)["iter_num"]):
        return "dcp", dcp
    return ("file", path) if os.path.exists(path) else (None, None)


# -----------------------------------------------------------------------------
# ckpt.pt

def read_checkpoint(path):
    """torch.load of a ckpt.pt, memory-mapped (the ranks of a node share one copy in the page cache, and nothing is
    read before it is used), with the ways it goes wrong told apart: not a checkpoint, truncated, another version."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:
        if head != b"PK\x03\x04":  # torch.save writes a zip file
            what = "not a nanothink checkpoint (not a file torch.save wrote)"
        elif "weights_only" in str(e):
            what = "not a nanothink checkpoint (it holds Python objects, which weights_only loading refuses)"
        else:
            what = "truncated or damaged (an interrupted copy or write?); copy it again or use an older checkpoint"
        raise CheckpointError(f"{path} is {what}") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a nanothink checkpoint (no model_args in it)")
    version, unknown = ckpt.get("version", 1), set(ckpt["model_args"]) - set(GPTConfig.defaults())
    if version > CHECKPOINT_VERSION or unknown:
        why = f"version {version}, this code reads {CHECKPOINT_VERSION}" if version > CHECKPOINT_VERSION else \
            f"model settings this code does not have: {', '.join(sorted(unknown))}"
        raise CheckpointError(f"{path} is from an incompatible version of nanothink ({why}); use the code that "
                              f"wrote it (git log) or retrain")
    return ckpt


def load_weights(model, state_dict, path):
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:  # missing, unexpected or differently shaped weights
        raise CheckpointError(f"{path} does not fit the model its own model_args describe (an incompatible version "
                              f"of nanothink?): {str(e).strip().splitlines()[-1].strip()[:200]}") from None


def write_checkpoint(out_dir, state, keep_last=1):
    """out_dir/ckpt.pt, atomically: written to a temporary file and renamed over the old one once complete, so a
    crash or a second Ctrl-C mid-write leaves the last one intact. With keep_last > 1 the one it replaces stays on as
    ckpt-<iter>.pt (a second name for the same file, not a copy), and only the newest keep_last are kept."""
    path = os.path.join(out_dir, "ckpt.pt")
    torch.save(state, path + ".tmp")
    with open(path + ".tmp", "rb") as f:
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    if keep_last > 1 and os.path.exists(path):
        previous = os.path.join(out_dir, f"ckpt-{read_checkpoint(path)['iter_num']}.pt")
        if not os.path.exists(previous):
            os.link(path, previous)
    os.replace(path + ".tmp", path)
    older = sorted((f for f in os.listdir(out_dir) if f.startswith("ckpt-") and f.endswith(".pt")),
                   key=lambda f: int(f[5:-3]) if f[5:-3].isdigit() else -1)
    for name in older[:max(0, len(older) - (keep_last - 1))]:
        os.remove(os.path.join(out_dir, name))


def rng_states(data_state):
    """This process's random streams: dropout (torch, cuda), numpy, python, and the data order (the state of the
    data generator before its next, perhaps already prefetched, batch)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "numpy": [np_state[1].tolist(), *np_state[2:]],  # as plain lists: weights_only loading takes no arrays
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "data": data_state}


def set_rng_states(rng, data_gen):  # the inverse of rng_states
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    np.random.set_state(("MT19937", np.array(rng["numpy"][0], dtype=np.uint32), *rng["numpy"][1:]))
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    data_gen.set_state(rng["data"])


def saved_config(out_dir):
    """The train.py settings of the run in out_dir (its later checkpoint) but MACHINE_SETTINGS, or None where there
    is none yet: what a resumed run goes on with, unless its command line says otherwise."""
    kind, path = newest(out_dir)
    if kind is None:
        return None
    config = (read_meta(path) if kind == "dcp" else read_checkpoint(path))["config"]
    return {k: v for k, v in config.items() if k not in MACHINE_SETTINGS}


def read_start(init_from, out_dir, sharded=False):
    """(checkpoint, path) a run starts from: for init_from='resume' the newer of out_dir's ckpt.pt and ckpt_dcp/ (a
    distributed one as its meta plus 'dcp', its contents loaded once the model is parallelized: load_sharded), for
    a run's directory its ckpt.pt, whose weights start a fresh run. ValueError saying why it cannot be had."""
    kind, path = newest(out_dir) if init_from == "resume" else (None, None)
    if kind == "dcp":
        return {**read_checkpoint(os.path.join(path, "meta.pt")), "dcp": path}, path
    path = os.path.join(out_dir if init_from == "resume" else init_from, "ckpt.pt")
    if not os.path.exists(path):
        raise ValueError(f"init_from={init_from!r} but {path} does not exist")
    if init_from == "resume" and sharded:
        raise ValueError(f"{path} is a single-file checkpoint; resume it with parallel='none' or 'ddp' and "
                         f"ep_size=1 (sharded layouts resume from the ckpt_dcp/ their own runs write)")
    ckpt = read_checkpoint(path)  # memory-mapped: the ranks of a node share one copy (page cache)
    if init_from == "resume" and not {"optimizers", "rng", "scaler"} <= set(ckpt):
        raise ValueError(f"{path} holds weights only (an export), not a run to resume; start a new run from it "
                         f"with init_from={out_dir!r} and another out_dir")
    return ckpt, path


def save(out_dir, state, model, optimizers, data_state, sharded=False, group=None, keep_last=1):
    """A run's checkpoint, called on every rank: `state` (the run's settings and position) plus every rank's random
    streams. Sharded layouts write a distributed checkpoint, every rank its own shards; otherwise rank 0 writes
    ckpt.pt while the others wait on `group` (checkpoint_group: a timeout sized for a write, not a step) and learn
    from it whether that worked. Returns the path; OSError on every rank when the write failed."""
    rngs = [rng_states(data_state)]
    if dist.is_initialized():
        mine, rngs = rngs[0], [None] * dist.get_world_size()
        dist.all_gather_object(rngs, mine)
    state = {"version": CHECKPOINT_VERSION, **state, "rng": rngs}
    if sharded:
        return save_sharded(out_dir, model, optimizers, state, group, keep_last)
    path, failed = os.path.join(out_dir, "ckpt.pt"), [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            write_checkpoint(out_dir, {**state, "model": model.state_dict(),
                                       "optimizers": [opt.state_dict() for opt in optimizers]}, keep_last)
        except OSError as e:
            failed = [f"could not write {path}: {e}"]
    if dist.is_initialized():
        dist.broadcast_object_list(failed, src=0, group=group)
    if failed[0]:
        raise OSError(failed[0])
    return path


def restore(ckpt, model, optimizers, scaler, data_gen, rank=0, group=None):
    """The rest of what read_start found, once the model is built and parallelized: its optimizer and GradScaler
    states (a distributed checkpoint's weights too, resharded) and this rank's random streams, so that the run goes
    on as if never stopped."""
    if "dcp" in ckpt:
        from torch.distributed.checkpoint import FileSystemReader
        names = FileSystemReader(ckpt["dcp"]).read_metadata().state_dict_metadata
    else:
        names = ckpt.get("model", {})
    if any(name.endswith("mlp.w1") for name in names):  # moe.py joins the weights on load, not the optimizer state
        raise ValueError(f"{ckpt.get('dcp', 'this checkpoint')} was saved before MoE layers held gate and up as one "
                         f"weight (w13): its weights load, its optimizer state does not. Start a new run from its "
                         f"weights: init_from=<its out_dir> with another out_dir")
    if "dcp" in ckpt:
        load_sharded(ckpt["dcp"], model, optimizers, group)
    else:
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"][rank % len(ckpt["rng"])], data_gen)  # each rank's own (dropout, data order)


# -----------------------------------------------------------------------------
# distributed checkpoints


def checkpoint_group(timeout_s):
    """All ranks again, as a gloo group with a timeout of its own, for waiting on checkpoint writes: the default
    group's timeout (NCCL's is 10 min) is sized for a step, and writing a 25 GB checkpoint to a slow disk can take
    longer. Gloo waits on the CPU, so no GPU collective is pending (and timing out) meanwhile."""
    from datetime import timedelta
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def save_sharded(out_dir, model, optimizers, meta, group=None, keep=1):
    """Every rank writes its shards of the model and optimizer state; rank 0 adds `meta` (iteration, config, RNG
    states...). Written to a temporary directory, then swapped in: a crash mid-save leaves the previous one intact.
    With keep > 1 the one it replaces stays on as ckpt_dcp-<iter>, and only the newest keep are kept. `group`
    (checkpoint_group) carries the waits, so that a slow rank's write does not time the others out."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final, tmp = os.path.join(out_dir, DCP_DIR), os.path.join(out_dir, DCP_DIR + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    if dist.is_initialized():
        dist.barrier(group)
    model_sd, optim_sd = get_state_dict(model, optimizers, options=_flat())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, process_group=group)
    if rank == 0:
        torch.save(meta, os.path.join(tmp, "meta.pt"))
        old = final + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        if os.path.exists(old) and keep > 1:
            iters = read_meta(old)["iter_num"]
            os.replace(old, os.path.join(out_dir, f"{DCP_DIR}-{iters}"))
        elif os.path.exists(old):
            shutil.rmtree(old)
        n = len(DCP_DIR) + 1
        older = sorted((d for d in os.listdir(out_dir) if d.startswith(DCP_DIR + "-") and d[n:].isdigit()),
                       key=lambda d: int(d[n:]))
        for name in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(os.path.join(out_dir, name))
    if dist.is_initialized():
        dist.barrier(group)
    return final


def find_sharded(out_dir):
    """The DCP checkpoint directory in out_dir, or None. A crash between save's two renames leaves only `.old`."""
    for path in (os.path.join(out_dir, DCP_DIR), os.path.join(out_dir, DCP_DIR + ".old")):
        if os.path.exists(os.path.join(path, "meta.pt")):
            return path
    return None


def read_meta(path):
    """A distributed checkpoint's meta.pt: everything but the shards (iteration, settings, tokenizer, RNG states)."""
    return torch.load(os.path.join(path, "meta.pt"), map_location="cpu", weights_only=True)


def load_sharded(path, model, optimizers, group=None):
    """Loads a DCP checkpoint into an already parallelized (or plain) model and its optimizers, resharding as
    needed: a checkpoint saved on 2 ranks loads on 1 or on 8. Returns the meta dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizers, options=_flat())
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path, process_group=group)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_flat())
    return read_meta(path)


# -----------------------------------------------------------------------------
# a run, in one process


def read_sharded_weights(path):
    """The model's weights from a distributed checkpoint, whole, in this process: only the model's keys are read
    (the optimizer state, twice the weights, stays on disk), straight into tensors of the shapes its metadata gives."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = dcp.FileSystemReader(path)
    weights = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in
               reader.read_metadata().state_dict_metadata.items()
               if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load(weights, storage_reader=reader, no_dist=True)
    return {k.removeprefix("model."): v for k, v in weights.items()}


def read_run(run_dir):
    """The later of a run's ckpt.pt and distributed checkpoint (newest), in one process and on the CPU, as one dict:
    model (the weights), model_args, config, iter_num, best_val_loss, and tokenizer when the run saved one."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist; give the out_dir of a training run")
    kind, path = newest(run_dir)
    if kind == "dcp":
        return {**read_meta(path), "model": read_sharded_weights(path)}
    if kind is None:
        raise FileNotFoundError(f"{os.path.join(run_dir, 'ckpt.pt')} not found, nor a distributed checkpoint "
                                f"(ckpt_dcp/); train a model first (python train.py ...)")
    ckpt = read_checkpoint(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path} holds no model weights")
    return ckpt


def dcp_to_ckpt(run_dir):
    """A run's distributed checkpoint -> run_dir/ckpt.pt (weights, settings, tokenizer, iteration): one file to copy.
    The run resumes from the distributed one all the same (newest: at equal iterations it wins)."""
    dcp = find_sharded(run_dir)
    if dcp is None:
        raise FileNotFoundError(f"no distributed checkpoint (ckpt_dcp/) in {run_dir}")
    path, tmp = os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "ckpt.pt.tmp")
    if newest(run_dir)[0] == "file":
        raise FileExistsError(f"{path} is newer than {dcp}; converting would replace it with an older checkpoint "
                              f"(move it away first to convert anyway)")
    run = read_run(run_dir)
    torch.save({k: run[k] for k in ("model", "model_args", "config", "iter_num", "best_val_loss", "tokenizer")
                if k in run}, tmp)
    os.replace(tmp, path)
    return path
