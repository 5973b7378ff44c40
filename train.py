"""
The training loop. Runs on one CPU or GPU, or on many with torchrun (layouts in parallel.py):

    python train.py config/train_shakespeare_char.py --batch_size=32
    torchrun --standalone --nproc_per_node=8 train.py config/medium_moe.py --parallel=fsdp+tp --tp_size=2
    python train.py config/medium_moe.py --dry_run=8    # that job's per-GPU memory, rehearsed on this CPU

Every hyperparameter is a global below (the model's are GPTConfig's fields); config files and --key=value override
them (configurator.py). The names follow nanoGPT's wherever the concept is the same, so its commands run unchanged.
"""

import math
import os
import sys
import textwrap
import time

import numpy as np
import torch
import torch.distributed as dist

import configurator
import data
import evaluation
import hardware
import moe
import plot
import reasoning
from checkpoint import (RUN_SETTINGS, CheckpointError, checkpoint_group, find_sharded, load_weights, newest,
                        read_start, restore, save, saved_config)
from constitution import describe_dpo, dpo_forward, reference_model
from convert import load_run
from model import GPT, GPTConfig
from parallel import (agree, check_layout, compile_blocks, exit_process, fail_fast, init_distributed, mesh_and_ranks,
                      optimizer_kwargs, parallelize, watch_signals)


def report(kind, error, traceback):
    """The one place an expected failure (a bad setting, a missing or damaged file) becomes one `error:` line."""
    if not issubclass(kind, (ValueError, FileNotFoundError, ImportError)):
        return sys.__excepthook__(kind, error, traceback)
    print(f"error: {error}", file=sys.stderr)


sys.excepthook = report

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"                  # checkpoints and metrics.jsonl go here
eval_interval = 2000             # iterations between evaluations (and checkpoints)
log_interval = 1                 # iterations between console / metrics.jsonl lines
eval_iters = 200                 # batches per split in each evaluation
eval_only = False                # evaluate once and exit
always_save_checkpoint = True    # save at every evaluation, not only when val loss improves
init_from = "scratch"            # 'scratch', 'resume' (from out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', ..., a run's
                                 # out_dir: its weights, with a fresh optimizer from iter 0 (to fine-tune), or
                                 # 'hf:FOLDER', a local Hugging Face Llama/Qwen3/Mixtral/GPT-2 folder (convert.py)
overwrite = False                # start afresh in an out_dir that holds another run's checkpoint, replacing it
keep_last = 1                    # checkpoints kept: ckpt.pt and the keep_last-1 before it as ckpt-<iter>.pt
stop_grace = 25.0                # seconds a SIGTERM / Ctrl-C leaves for the step and the save (torchrun kills at 30)
save_timeout = 3600.0            # seconds the other ranks wait for rank 0 to write a checkpoint
# logging
wandb_log = False                # log to Weights & Biases (needs `pip install wandb`)
wandb_project = "nanothink"
wandb_run_name = "run"
# data
dataset = "openwebtext"          # reads data/<dataset>/{train,val}.bin (or shards train_000000.bin, ...), meta.json
gradient_accumulation_steps = 1  # micro-batches per optimizer step (summed over all data-parallel ranks)
batch_size = 12                  # sequences per micro-batch
block_size = 1024                # tokens per sequence
# fine-tuning on conversations (constitution.py): sft on prompt/response pairs, dpo on preference pairs
mode = "pretrain"                # 'pretrain' (train.bin/val.bin), 'sft' or 'dpo' (train_jsonl/val_jsonl)
train_jsonl = ""                 # sft: {"prompt","response"} lines; dpo: {"prompt","chosen","rejected"[,"p_chosen"]}
val_jsonl = ""                   # held-out lines of the same kind; empty: every tenth line of train_jsonl
dpo_beta = 0.1                   # DPO's beta: a larger one keeps the policy closer to the reference
dpo_soft_labels = False          # target each pair's p_chosen rather than 1 (conservative DPO on AI-feedback labels)
ref_from = ""                    # dpo: out_dir of the frozen reference model; empty: the weights this run starts from
# model: every field of model.GPTConfig is a setting too (n_layer, n_embd, n_expert, dre, ...), with the
# dataclass's defaults and comments there; vocab_size comes from the data's meta.json. train.py reads them as
# model_config's fields, below
moe_bias_rate = 1e-3             # moe_balance='bias': bias step per optimizer step
# optimizer
optimizer = "adamw"              # 'adamw' or 'muon' (Muon for hidden matrices, AdamW for the rest)
learning_rate = 6e-4             # peak learning rate
max_iters = 600000               # total optimizer steps
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                  # clip the global gradient norm to this; 0 disables
# learning rate schedule
decay_lr = True                  # False: constant learning_rate after warmup
lr_schedule = "cosine"           # 'cosine' (to min_lr at lr_decay_iters) or 'wsd' (constant, then linear cooldown)
warmup_iters = 2000              # linear warmup steps
lr_decay_iters = 600000          # where the schedule reaches min_lr (~= max_iters per Chinchilla)
cooldown_frac = 0.2              # 'wsd' only: fraction of lr_decay_iters spent decaying
min_lr = 6e-5                    # ~= learning_rate/10 per Chinchilla
# system
device = "auto"                  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"                   # 'float32', 'bfloat16', 'float16'; auto: bf16 on capable GPUs, see below for CPU
compile = False                  # torch.compile the model (pays on GPUs; on small CPU models it does not)
backend = "auto"                 # torch.distributed backend: 'nccl', 'gloo'; auto: nccl on CUDA, else gloo
parallel = "auto"                # 'ddp', 'fsdp', 'tp', 'fsdp+tp' under torchrun (parallel.py); auto: ddp if several
tp_size = 1                      # tensor-parallel group size ('tp', 'fsdp+tp')
ep_size = 1                      # expert-parallel group size (with 'ddp' or 'fsdp'): each rank n_expert/ep_size experts
pp_size = 1                      # pipeline stages, the blocks split evenly between them: ranks = pp x dp x tp
pp_schedule = "1F1B"             # '1F1B', 'GPipe' or 'Interleaved1F1B' (torch.distributed.pipelining)
pp_microbatches = 0              # pieces each micro-batch is cut into for the pipeline (m); 0: pp_size
pp_virtual_stages = 1            # Interleaved1F1B: stages per rank (v), which divides the bubble by v
fsdp_reshard_after_forward = True  # False: keep parameters gathered from forward to backward (ZeRO-2-like)
fsdp_cpu_offload = False         # keep sharded parameters, gradients and optimizer state in CPU memory
seed = 1337
peak_flops = 0.0                 # FLOP/s that MFU is measured against; 0: look it up / measure it
dry_run = 0                      # N > 0: rehearse an N-GPU job on this CPU (rank 0's memory, FLOPs), exit (dryrun.py)
gpu_memory = 80.0                # GiB per GPU that the dry run checks the job fits
# -----------------------------------------------------------------------------
globals().update({k: v for k, v in GPTConfig.defaults().items() if k not in globals() and k != "vocab_size"})
config_keys = list(configurator.hyperparameters(globals()))
given = set()  # the settings this command line sets; a resumed run takes the others from its checkpoint
globals().update(configurator.apply(configurator.hyperparameters(globals()), sys.argv[1:], given=given))
if init_from == "resume" and (saved := saved_config(out_dir)):  # the run goes on as it was started...
    for key in sorted(set(config_keys) & set(saved)):
        if key not in given:
            globals()[key] = saved[key]
        elif saved[key] != globals()[key] and os.environ.get("RANK", "0") == "0":  # ...but for what is asked
            print(f"{key}: {saved[key]!r} -> {globals()[key]!r}")
config = {k: globals()[k] for k in config_keys}

# every setting is checked before any work: a bad one ends the run in one line naming it, nothing touched
configurator.check_training(config)
model_config = GPTConfig.from_settings(config)  # the model's own settings (sizes, dropout, MoE, DRE), checked


if dry_run:  # the job rehearsed on this CPU at its full size, then exit (dryrun.py)
    import dryrun
    sys.exit(dryrun.run(config, vars(GPTConfig.from_settings(config, vocab_size=data.padded_vocab(
        data.read_meta(os.path.join("data", dataset)), mode))), dry_run, gpu_memory))
if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) and init_from != "resume" and (
        os.path.exists(os.path.join(out_dir, "ckpt.pt")) or find_sharded(out_dir)):
    init_from = "resume"  # torchrun restarted the workers after a failure: go on from the last checkpoint
    if os.environ.get("RANK") == "0":
        print(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming from the last checkpoint in "
              f"{out_dir}")

# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE: one process per device
try:
    rank, local_rank, world_size, device = init_distributed(hardware.pick_device(device), backend)
except RuntimeError as e:
    raise ValueError(e) from None
distributed, master = world_size > 1, rank == 0
device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]

dtype, ptdtype = hardware.pick_dtype(dtype, device_type, model_config.n_embd)
autocast = hardware.autocast(device_type, dtype)
config["device"], config["dtype"] = device, dtype

if parallel == "auto":
    parallel = "ddp" if world_size > pp_size else "none"
pp_microbatches = pp_microbatches or pp_size
try:
    check_layout(parallel, tp_size, world_size, model_config, batch_size, block_size,
                 gradient_accumulation_steps, optimizer, dtype, ep_size, pp_size, pp_schedule, pp_microbatches,
                 pp_virtual_stages)
except ValueError as e:
    if master:
        print(f"error: {e}")
    exit_process(1)
# checkpoints through torch.distributed.checkpoint
sharded = parallel in ("fsdp", "tp", "fsdp+tp") or ep_size > 1 or pp_size > 1
# data-parallel ranks read different slices of each global batch; tensor-parallel and pipeline ranks the same one
mesh, dp_rank, dp_size = mesh_and_ranks(parallel, tp_size, world_size, device_type, pp_size)
loss_ranks = world_size // pp_size  # the ranks a step's loss is on (a pipeline's last stage: the others add 0)
if gradient_accumulation_steps % dp_size == 0:  # the step's micro-batches are shared out among the ranks...
    gradient_accumulation_steps //= dp_size
else:  # ...or, when there are too few, each micro-batch is (check_layout made sure one of the two divides)
    batch_size //= dp_size
tokens_per_iter = gradient_accumulation_steps * dp_size * batch_size * block_size
if master:
    print("config: " + textwrap.fill(" ".join(f"{k}={v!r}" for k, v in config.items()), 116,
                                     subsequent_indent="        "))
    print(f"tokens per iteration: {tokens_per_iter:,}")
torch.manual_seed(seed)  # the same initial weights on every rank (FSDP and TP shard each rank's own copy)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # (CUDA only; harmless elsewhere)

# -----------------------------------------------------------------------------
# data: token ids in flat binary files, sampled as random windows
data_dir = os.path.join("data", dataset)
meta = data.read_meta(data_dir)
token_dtype = np.dtype(meta.get("dtype", "uint16"))
bin_splits = ("train", "val") if mode == "pretrain" else ()  # sft and dpo read JSONL instead, tokenized once here
token_files = data.check_token_files(data_dir, bin_splits, token_dtype, block_size)  # {split: files}

def get_batch(split, generator):
    """This data-parallel rank's share of the next global batch: every rank draws the same dp_size*batch_size
    windows (or examples) from the same generator and keeps its own slice, so a step sees the same data in every
    layout. (X, Y) of token windows, (X, Y) for sft and (X, Y, p) for dpo, Y -1 outside the responses."""
    batch = data.finetune_batch(chat_data[split], batch_size, block_size, generator, dp_rank, dp_size) \
        if mode != "pretrain" else data.pretrain_batch(token_files[split], token_dtype, batch_size, block_size,
                                                       generator, dp_rank, dp_size, vocab_size)
    if device_type == "cuda":
        return [t.pin_memory().to(device, non_blocking=True) for t in batch]
    return [t.to(device) for t in batch]


# the data position is this generator's state: it is saved in the checkpoint and restored on resume
data_gen = torch.Generator().manual_seed(seed)

# -----------------------------------------------------------------------------
# model
ckpt_path = os.path.join(out_dir, "ckpt.pt")


def init_model():
    """The model init_from names, its settings, the spec of the tokenizer its ids are in (saved with every
    checkpoint), and what a resumed run continues from (None unless 'resume'): 'scratch' (the data's tokenizer);
    'resume', from the later of out_dir's ckpt.pt and distributed checkpoint; a run's out_dir, whose weights start
    a fresh run (to fine-tune); 'hf:FOLDER' or a GPT-2 name. ValueError when that cannot be had."""
    if init_from == "scratch":
        args = dict(vars(GPTConfig.from_settings(config, vocab_size=data.padded_vocab(meta, mode))))
        with torch.device("meta" if on_meta else "cpu"):
            model = GPT(GPTConfig(**args))
        return model if on_meta else model.to(device), args, data.tokenizer_spec(meta), None
    if init_from != "resume":  # weights to start from: this run's settings, the source's architecture and tokenizer
        if not init_from.startswith(("gpt2", "hf:")) and not (os.path.isdir(init_from) and newest(init_from)[0]):
            raise ValueError(f"init_from={init_from!r} but {os.path.join(init_from, 'ckpt.pt')} does not exist "
                             f"(init_from is 'scratch', 'resume', 'gpt2*', 'hf:FOLDER' or a run's out_dir)")
        model, tokenizer, _ = load_run(init_from, device, **{k: config[k] for k in RUN_SETTINGS})
        if init_from.startswith(("gpt2", "hf:")) and block_size < model.config.block_size:
            model.crop_block_size(block_size)
        return model.train(), dict(vars(model.config)), tokenizer.spec, None
    ckpt, path = read_start(init_from, out_dir, sharded)
    # the architecture comes from the checkpoint; everything else from this run's config
    args = {**vars(model_config), **{k: v for k, v in ckpt["model_args"].items() if k not in RUN_SETTINGS}}
    with torch.device("meta" if on_meta else device):  # (on a GPU node no rank holds weights in host memory)
        model = GPT(GPTConfig(**args))
    if "model" in ckpt:  # copied from the file's pages, shared by the node's ranks
        load_weights(model, ckpt["model"], path)
    return model, args, ckpt.get("tokenizer") or data.tokenizer_spec(meta), ckpt


# a sharded run starts on `meta`, each rank drawing (GPT.materialize) or loading its parts; DDP wraps whole models
on_meta = distributed and parallel != "ddp" and init_from in ("scratch", "resume") and (mode != "dpo" or bool(ref_from))
if init_from == "scratch" and not eval_only:  # a run that cannot fit stops here, in one line, before it allocates
    import dryrun
    dryrun.refuse_what_cannot_fit(vars(GPTConfig.from_settings(config, vocab_size=data.padded_vocab(meta, mode))),
                                  {**config, "parallel": parallel, "on_meta": on_meta}, world_size, device_type, master)
old_ckpt = [p for p in (ckpt_path, find_sharded(out_dir)) if p and os.path.exists(p)]
if old_ckpt and init_from != "resume" and not overwrite and not eval_only:  # one run per out_dir, unless asked
    if master:
        print(f"error: {out_dir} holds another run's checkpoint ({', '.join(old_ckpt)}); continue it with "
              f"--init_from=resume, start elsewhere with --out_dir=..., or replace it with --overwrite=True")
    exit_process(1)
try:
    model, model_args, tokenizer_spec, resume = init_model()
except ValueError as e:
    raise ValueError(f"init_from={init_from!r}: {e}" if isinstance(e, CheckpointError) else e) from None
if block_size > model.config.block_size:
    raise ValueError(f"block_size={block_size} exceeds the model's {model.config.block_size} ({init_from}); "
                     f"set block_size <= {model.config.block_size}")
iter_num, best_val_loss = (resume["iter_num"], resume["best_val_loss"]) if resume else (0, float("inf"))
if resume and master:
    print(f"resuming {resume.get('dcp', ckpt_path)} from iter {iter_num} (best val loss {best_val_loss:.4f})")
vocab_size = model.config.vocab_size
if meta.get("vocab_size", 0) > vocab_size:
    raise ValueError(f"data/{dataset} has vocab_size={meta['vocab_size']} but the model only {vocab_size}")
data.check_token_files(data_dir, bin_splits, token_dtype, block_size, vocab_size)  # the ids too, now
if mode != "pretrain":  # conversations in the tokenizer of the weights this run starts from (or the data's)
    chat_data = data.finetune_data(mode, train_jsonl, val_jsonl, data.Tokenizer(tokenizer_spec))
    if master:
        print(f"{mode}: {len(chat_data['train'])} training and {len(chat_data['val'])} validation examples")
val_bytes_per_token = None  # evaluations report bits per byte, val loss / ln 2 / this, which any tokenizer shares
if mode == "pretrain":
    try:  # measured on (up to 4M tokens of) val.bin, decoded by the tokenizer that wrote it
        val_bytes_per_token = evaluation.bytes_per_token(
            data.Tokenizer(meta), np.memmap(token_files["val"][0], dtype=token_dtype, mode="r")[:2**22])
    except (ImportError, ValueError, OSError, IndexError, KeyError) as e:  # tiktoken offline, ids past the vocab
        if master:
            print(f"note: no bits per byte in evaluations: val.bin did not decode ({type(e).__name__}: {e})")
ref_model = None
if mode == "dpo":  # DPO's frozen reference: ref_from's weights, by default those this run started from
    if not ref_from and resume:
        ref_from = resume["config"].get("ref_from", "")  # what the interrupted run used
        if not ref_from:
            raise ValueError("this dpo run started from scratch, so its reference is gone: set ref_from")
    ref_model = reference_model(ref_from or model, device)
    config["ref_from"] = ref_from or (init_from if os.path.isdir(init_from) else "")
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"parameters: {model.num_params(non_embedding=False) / 1e6:.2f}M "
          f"({model.num_params() / 1e6:.2f}M in matmuls, {model.num_params(active=True) / 1e6:.2f}M of them active "
          f"per token)")

raw_model = model
flops_per_token = model.flops_per_token(block_size)  # (a pipeline stage holds part of the model)
if compile:  # block by block, at the first step: compile time does not grow with depth (parallel.compile_blocks)
    compile_blocks(model)
# GPU fsdp: bf16 (or fp16) compute with fp32 gradient reduction; elsewhere autocast does the casting
param_dtype = ptdtype if device_type == "cuda" and "fsdp" in parallel and dtype != "float32" else None
pipeline = dict(schedule=pp_schedule, microbatches=pp_microbatches, virtual=pp_virtual_stages,
                accumulation=gradient_accumulation_steps, batch=batch_size, seq_len=block_size) if pp_size > 1 else None
model = parallelize(model, parallel, mesh, device_type, param_dtype, fsdp_reshard_after_forward, fsdp_cpu_offload,
                    ep_size, pipeline)  # a Layout, or (pp_size > 1) a Pipeline and raw_model this rank's stages
if on_meta:  # from the generator as init_model left it (a pipeline's stages hold buffers of their own)
    raw_model.materialize("cpu" if fsdp_cpu_offload else device, [model] if pp_size > 1 else [], draw=not resume)
torch.manual_seed(seed + dp_rank)  # dropout: tp ranks of a group draw the same masks on replicated activations

scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
optimizers = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                                            optimizer_kwargs(raw_model, device_type))

# rank 0's checkpoint writes are waited for on a group of their own, with a timeout sized for them (save_timeout)
ckpt_group = checkpoint_group(save_timeout) if distributed else None
saved_iter = iter_num if resume else None  # the iteration of the checkpoint on disk, for the messages
if resume:
    restore(resume, raw_model, optimizers, scaler, data_gen, rank, ckpt_group)
    resume = None  # free memory


def save_checkpoint():
    """Called on every rank: checkpoint.save gathers each rank's random streams, and all learn whether it worked."""
    global saved_iter
    t0 = time.perf_counter()
    state = {"model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config,
             "tokenizer": tokenizer_spec, "scaler": scaler.state_dict()}
    try:
        path = save(out_dir, state, raw_model, optimizers, data_state, sharded, ckpt_group, keep_last)
    except OSError as e:
        stop(f"error: {e}; the previous checkpoint is kept. Free some disk space or point out_dir elsewhere")
    saved_iter = iter_num
    if master:
        print(f"saved {'distributed ' * sharded}checkpoint to {path} (iter {iter_num}, "
              f"{time.perf_counter() - t0:.1f} s)")


def forward(batch):
    """The loss of a batch and, in dpo mode, its preference statistics (accuracy, reward margin, rewards). In
    evaluation a DRE model records each token's core steps against its loss, for its metrics()."""
    if mode == "dpo":
        return dpo_forward(model, ref_model, *batch, dpo_beta, dpo_soft_labels)
    logits, loss = model(*batch)
    if raw_model.config.dre and not model.training:
        raw_model.depth.observe(logits, batch[1])
    return loss, {}


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches per split (and in dpo mode the mean statistics, as 'val_accuracy' etc.;
    for a DRE model its metrics() as 'val_dre'). The batches are the same at every evaluation (a generator seeded
    afresh), which makes successive evaluations comparable and leaves the training data stream untouched."""
    out, dre_metrics = {}, {}
    model.eval()
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + 1)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            with autocast:
                loss, stats = forward(get_batch(split, gen))
            losses[k] = loss.item()
            for name, value in stats.items():
                out[f"{split}_{name}"] = out.get(f"{split}_{name}", 0.0) + value.item() / eval_iters
        out[split] = losses.mean().item()
        if raw_model.config.dre:  # this rank's tokens: steps, core FLOPs, Spearman(steps, loss) at dre_threshold
            dre_metrics[split] = raw_model.depth.metrics()
    model.train()
    if distributed:  # the mean over data-parallel ranks, each of which evaluated its slice of the batches
        keys = sorted(out)
        values = torch.tensor([out[k] for k in keys], device=device)
        dist.all_reduce(values)
        out = dict(zip(keys, (values / loss_ranks).tolist()))
    if val_bytes_per_token:
        out["val_bpb"] = out["val"] / math.log(2) / val_bytes_per_token
    return out, dre_metrics.get("val")


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    if it > lr_decay_iters:
        return min_lr
    if lr_schedule == "wsd":
        decay_start = lr_decay_iters * (1 - cooldown_frac)
        if it < decay_start:
            return learning_rate
        return learning_rate + (it - decay_start) / (lr_decay_iters - decay_start) * (min_lr - learning_rate)
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def feature_logs(stats, moe_loss):
    """Each feature's line and metrics.jsonl fields since the last log line: MoE routing, the DRE's drawn core
    steps, DPO's preference statistics. Every rank calls it (it resets the MoE counters). One host read for all of
    them: every MoE layer's counters, the MoE loss and the DPO statistics come in one transfer (moe.read_metrics)."""
    lines, record, layers = [], {}, raw_model.moe_layers()
    metrics, values = moe.read_metrics(layers, *([moe_loss] if layers else []), *stats.values())
    if layers:
        record.update(moe_loss=values.pop(0), moe=metrics)
        lines.append(moe.describe(record["moe"], record["moe_loss"]))
    if raw_model.config.dre:
        record["dre_steps"] = raw_model.depth.pop_sampled()
        lines.append(reasoning.describe_drawn(record["dre_steps"], model_config.dre_sample_steps))
    if stats:
        record.update(zip(stats, values))
        lines.append(describe_dpo(record))
    return lines, record


def stop(message, code=1):
    if master:
        print(message)
    exit_process(code)


def last_checkpoint():  # for the signal thread's messages
    return (f"the last checkpoint (iter {saved_iter}) in {out_dir} is intact" if saved_iter is not None
            else "no checkpoint was saved yet")


# the first SIGTERM / Ctrl-C sets this: finish the step, save a checkpoint, exit cleanly (a second one quits at once)
signalled = watch_signals(stop_grace, last_checkpoint, say=master)
if distributed:
    fail_fast(rank)

wandb = None
if wandb_log and master:
    try:
        import wandb
    except ImportError:
        raise ImportError("wandb_log=True needs Weights & Biases: pip install wandb") from None
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
# rank 0 appends to out_dir/metrics.jsonl (plot.py draws it), first a line marking where this run (or resumed part
# of one) starts: the file may hold several
log = plot.MetricsLog(out_dir, {"run_start": time.time(), "iter": iter_num, "init_from": init_from,
                                "world_size": world_size}, wandb) if master else lambda record: None


# -----------------------------------------------------------------------------
# the loop
flops_per_iter = flops_per_token * tokens_per_iter / world_size
peak = hardware.hardware_peak_flops(device_type, ptdtype, peak_flops) if master else 1.0
nonfinite = torch.zeros((), device=device)  # becomes 1 at any non-finite loss; read only at log/eval time
t_log, iters_since_log, start_iter = time.perf_counter(), 0, iter_num
t_start = t_log
data_state, batch = data_gen.get_state(), get_batch("train", data_gen)  # the first micro-batch
while True:
    lr = get_lr(iter_num)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    evaluate = iter_num % eval_interval == 0 or iter_num == max_iters or eval_only
    # ranks agree on stopping (a signal, a non-finite loss) at log and eval intervals only: agree() is a host sync.
    # One process acts on a signal at once, after reading the flag all the same (no non-finite weights are saved).
    stop_requested = signalled.is_set() and not distributed
    if evaluate or stop_requested or iter_num % log_interval == 0:
        stop_requested, bad = agree(signalled.is_set(), nonfinite, device)
        if bad:
            stop(f"error: non-finite loss before iter {iter_num}; stopping before any checkpoint is overwritten "
                 f"(the last good one is in {out_dir}). Try a lower learning_rate, grad_clip > 0 or "
                 f"dtype='float32'.")
    if stop_requested:
        save_checkpoint()
        stop(f"stopped by signal at iter {iter_num}", code=0)

    if evaluate:
        losses, dre_val = estimate_loss()
        if master:
            extra = {k: v for k, v in losses.items() if k not in ("train", "val")}  # dpo: accuracy, margin, ...
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                  + "".join(f", {k} {v:.4f}" for k, v in extra.items() if k.startswith("val_")))
            if dre_val is not None:
                print(f"  {reasoning.describe(dre_val)}")
                extra["val_dre"] = dre_val
            log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], **extra})
        if not all(map(math.isfinite, losses.values())):
            stop(f"error: non-finite eval loss at iter {iter_num}; the last checkpoint in {out_dir} is kept. "
                 f"Try a lower learning_rate, grad_clip > 0 or dtype='float32'.")
        if eval_only:
            break
        if losses["val"] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses["val"])
            if iter_num > start_iter:
                save_checkpoint()
        t_log, iters_since_log = time.perf_counter(), 0  # keep evaluation out of the iteration timings
    if iter_num >= max_iters:
        break

    # one optimizer step: gradient_accumulation_steps micro-batches, gradients synchronised on the last only
    loss_sum, moe_loss_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    stats_sum = {}  # dpo: accuracy, reward margin and rewards, averaged like the loss
    if raw_model.config.dre:  # core steps: one draw per optimizer step, the same on every rank (reasoning.py)
        raw_model.depth.iteration = iter_num
    for micro_step in range(gradient_accumulation_steps):
        model.no_sync(sync=micro_step == gradient_accumulation_steps - 1)
        with autocast:
            loss, stats = forward(batch)
            loss = loss / gradient_accumulation_steps
            moe_loss = model.moe_loss() / gradient_accumulation_steps  # 0 if dense
        # the next micro-batch, read and copied while the device runs this one (nanoGPT's prefetch); a checkpoint
        # keeps the generator's state from before it, so that a resumed run draws it again
        data_state, batch = data_gen.get_state(), get_batch("train", data_gen)
        model.backward(scaler.scale(loss + moe_loss))  # (a pipeline ran it piece by piece, inside its forward)
        loss_sum += loss.detach()
        moe_loss_sum += moe_loss.detach()
        for name, value in stats.items():
            stats_sum[name] = stats_sum.get(name, 0.0) + value / gradient_accumulation_steps
    moe.sync_expert_grads(raw_model)  # expert parallelism: each expert's gradient over the ranks holding it
    model.finish_backward()  # a pipeline: a tied embedding's gradient, summed over the first and last stages
    nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss_sum + moe_loss_sum)).float())
    if grad_clip != 0.0:
        for opt in optimizers:
            scaler.unscale_(opt)
        model.clip_grad_norm_(grad_clip)
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=not model.grads_in_buckets)
    if raw_model.config.moe_balance == "bias":  # nudge the routing biases toward equal load (moe.py)
        for layer in raw_model.moe_layers():
            layer.update_bias(moe_bias_rate)
    iter_num += 1
    iters_since_log += 1

    if iter_num % log_interval == 0:
        if distributed:  # log the global batch's loss, not rank 0's share
            losses = torch.stack([loss_sum, moe_loss_sum])
            dist.all_reduce(losses)
            loss_sum, moe_loss_sum = losses / loss_ranks  # (a pipeline's MoE losses: each stage its own share)
        lines, features = feature_logs(stats_sum, moe_loss_sum)
        if master:
            lossf = loss_sum.item()  # host syncs (this and the flags above) happen only at log intervals
            now = time.perf_counter()
            dt = (now - t_log) / iters_since_log
            t_log, iters_since_log = now, 0
            tok_s, mfu, eta = tokens_per_iter / dt, flops_per_iter / dt / peak, (max_iters - iter_num) * dt
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, {tok_s:,.0f} tok/s, "
                  f"mfu {mfu * 100:.1f}%, eta {eta / 60:.1f} min" + "".join(f"\n  {line}" for line in lines))
            log({"iter": iter_num, "loss": lossf, "lr": lr, "ms": dt * 1000, "tokens_per_sec": tok_s, "mfu": mfu,
                 "eta_s": eta, **features})

if master and not eval_only:  # the run in one line, and what to do next
    wall = time.perf_counter() - t_start
    saved = find_sharded(out_dir) if sharded else ckpt_path if os.path.exists(ckpt_path) else None
    print(f"done: {iter_num - start_iter} iterations in {wall / 60:.1f} min, best val loss {best_val_loss:.4f}, "
          f"{(iter_num - start_iter) * tokens_per_iter / wall:,.0f} tokens/s; checkpoint "
          + (f"{saved}; sample it: python sample.py --out_dir={out_dir}" if saved else "none saved"))
if wandb is not None:
    wandb.finish()
exit_process(0)
