"""
The training loop. Runs on one CPU or GPU, or on many with torchrun (layouts in parallel.py):

    python train.py config/train_shakespeare_char.py
    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --parallel=ddp
    torchrun --standalone --nproc_per_node=8 train.py config/medium_moe.py --parallel=fsdp+tp --tp_size=2

Every hyperparameter is a global below; config files and --key=value override them (see configurator.py).
The names follow nanoGPT's wherever the concept is the same, so its commands run unchanged.
"""

import json
import math
import os
import random
import signal
import sys
import textwrap
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

import configurator
import parallel as parallelism  # the module; `parallel` below is the layout's name
import constitution
import reasoning
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"                  # checkpoints and metrics.jsonl go here
eval_interval = 2000             # iterations between evaluations (and checkpoints)
log_interval = 1                 # iterations between console / metrics.jsonl lines
eval_iters = 200                 # batches per split in each evaluation
eval_only = False                # evaluate once and exit
always_save_checkpoint = True    # save at every evaluation, not only when val loss improves
init_from = "scratch"            # 'scratch', 'resume' (from out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', ... or a run's
                                 # out_dir: its weights, with a fresh optimizer from iter 0 (to fine-tune)
# logging
wandb_log = False                # log to Weights & Biases (needs `pip install wandb`)
wandb_project = "nanothink"
wandb_run_name = "run"
# data
dataset = "openwebtext"          # reads data/<dataset>/{train,val}.bin and meta.json
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
# model
layout = "modern"                # 'modern' (RoPE, RMSNorm, SwiGLU) or 'gpt2' (learned positions, LayerNorm, GELU)
n_layer = 12
n_head = 12
n_kv_head = 0                    # 0: same as n_head; fewer: grouped-query attention
n_embd = 768
mlp_hidden = 0                   # 0: the layout's default width
dropout = 0.0                    # 0 for pretraining, try 0.1+ for fine-tuning
bias = False                     # biases in Linear layers and norms
qk_norm = False                  # RMSNorm on queries and keys
tie_embeddings = True            # share the token embedding with the output head
rope_theta = 10000.0
# mixture of experts (moe.py): n_expert > 0 replaces the MLP of every moe_every-th block
n_expert = 0
top_k = 2                        # experts per token
expert_hidden = 0                # each expert's width; 0: mlp_hidden
moe_every = 1
n_shared_expert = 0              # experts that see every token
capacity_factor = 0.0            # 0: dropless; else tokens over ceil(tokens*top_k*factor/n_expert) are dropped
router_score = "softmax"         # 'softmax' or 'sigmoid'
router_renormalize = True        # the top_k weights of a token sum to one
moe_balance = "aux"              # 'aux': Switch loss; 'bias': also DeepSeek-V3's aux-loss-free routing bias
aux_loss_coef = 0.01             # Switch load-balancing loss
z_loss_coef = 0.001              # router z-loss
moe_bias_rate = 1e-3             # moe_balance='bias': bias step per optimizer step
# dynamic reasoning engine (reasoning.py): the blocks between the first n_prelude and the last n_coda of the n_layer
# form a core that runs r times, r drawn per step in training and chosen per token at inference
dre = False
n_prelude = 1                    # blocks run once before the core
n_coda = 1                       # blocks run once after it
max_reasoning_steps = 6          # the most core steps a token runs
dre_sample_steps = True          # r drawn per optimizer step (heavy-tailed, clipped to max); False: always the max
dre_mean_steps = 4.0             # mean r drawn in training
dre_backprop_steps = 6           # gradients flow through the core's last this-many steps
dre_threshold = 1e-2             # evaluation: a token stops once its prediction moves less than this (KL in nats)
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
fsdp_reshard_after_forward = True  # False: keep parameters gathered from forward to backward (ZeRO-2-like)
fsdp_cpu_offload = False         # keep sharded parameters, gradients and optimizer state in CPU memory
grad_checkpoint = False          # recompute activations in backward to save memory
seed = 1337
peak_flops = 0.0                 # FLOP/s that MFU is measured against; 0: look it up / measure it
# -----------------------------------------------------------------------------
config_keys = list(configurator.hyperparameters(globals()))
try:
    globals().update(configurator.apply(configurator.hyperparameters(globals()), sys.argv[1:]))
except configurator.ConfigError as e:
    sys.exit(f"error: {e}")
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE: one process per device
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
try:
    rank, local_rank, world_size, device = parallelism.init(device, backend)
except RuntimeError as e:
    sys.exit(f"error: {e}")
distributed, master = world_size > 1, rank == 0
device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]

if dtype == "auto":
    if device_type == "cuda":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        # measured with bench.py on a 2-core CPU (README): bf16 autocast is 1.7x faster than fp32 at 256 wide,
        # but only 0.9-1.3x at 128-192, where the casts cost about what the faster matmuls save
        dtype = "bfloat16" if device_type == "cpu" and n_embd >= 256 else "float32"
dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
if dtype not in dtypes:
    sys.exit(f"error: dtype must be one of {', '.join(dtypes)} or 'auto', got {dtype!r}")
if dtype == "float16" and device_type == "cpu":
    sys.exit("error: float16 autocast is not supported on the CPU; use bfloat16 or float32")
ptdtype = dtypes[dtype]
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
config["device"], config["dtype"] = device, dtype

if parallel == "auto":
    parallel = "ddp" if world_size > 1 else "none"
try:
    parallelism.check_layout(parallel, tp_size, world_size, GPTConfig(
        n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, mlp_hidden=mlp_hidden, layout=layout,
        qk_norm=qk_norm, n_expert=n_expert, top_k=top_k, expert_hidden=expert_hidden, moe_every=moe_every, dre=dre,
        n_prelude=n_prelude, n_coda=n_coda),
        batch_size, block_size, gradient_accumulation_steps)
    if parallel in ("fsdp", "tp", "fsdp+tp") and (optimizer == "muon" or dtype == "float16"):
        raise ValueError(f"parallel={parallel!r} works with optimizer='adamw' and fp32/bf16 only")
except ValueError as e:
    if master:
        print(f"error: {e}")
    parallelism.teardown()
    sys.exit(1)
sharded = parallel in ("fsdp", "tp", "fsdp+tp")  # checkpoints go through torch.distributed.checkpoint
# data-parallel ranks read different slices of each global batch; tensor-parallel ranks of a group the same one
mesh, dp_rank, dp_size = parallelism.mesh_and_ranks(parallel, tp_size, world_size, device_type)
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
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------
# data: token ids in flat binary files, sampled as random windows
data_dir = os.path.join("data", dataset)
meta_path = os.path.join(data_dir, "meta.json")
meta = {}
if os.path.exists(meta_path):
    with open(meta_path) as f:
        meta = json.load(f)
token_dtype = np.dtype(meta.get("dtype", "uint16"))
bin_splits = ("train", "val") if mode == "pretrain" else ()  # sft and dpo read JSONL instead, tokenized once here
if mode != "pretrain":
    tokenizer = constitution.Tokenizer(meta)  # meta.json's tokenizer; GPT-2's without one, as for the token files
    meta.setdefault("vocab_size", tokenizer.vocab_size)
    try:
        chat_data = constitution.finetune_data(mode, train_jsonl, val_jsonl, tokenizer)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if master:
        print(f"{mode}: {len(chat_data['train'])} training and {len(chat_data['val'])} validation examples")
for split in bin_splits:
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        script = f"data/{dataset}/prepare.py"
        how = f"python {script}" if os.path.exists(script) else \
            f"python data/text/prepare.py --out_dir {data_dir} YOUR_TEXT_FILES"
        sys.exit(f"error: {path} not found; prepare the data first: {how}")
    if os.path.getsize(path) // token_dtype.itemsize <= block_size:
        sys.exit(f"error: {path} holds fewer than block_size+1={block_size + 1} tokens")


def check_token_range(tokens, where):
    if tokens.size and tokens.max() >= vocab_size:
        sys.exit(f"error: token id {tokens.max()} in {where} is out of range for vocab_size={vocab_size}; "
                 f"was data/{dataset} prepared with another tokenizer?")


def get_batch(split, generator):
    """This data-parallel rank's share of the next global batch: every rank draws the same dp_size*batch_size
    windows from the same generator and keeps its own slice, so a step sees the same data in every layout."""
    lo, hi = dp_rank * batch_size, (dp_rank + 1) * batch_size
    if mode != "pretrain":  # (X, Y) for sft, (X, Y, p) for dpo; Y is -1 outside the responses
        batch_fn = constitution.sft_batch if mode == "sft" else constitution.preference_batch
        # the rank's slice is taken of the examples: a dpo batch has two rows (chosen, rejected) per example
        return [t.to(device) for t in batch_fn(chat_data[split], batch_size, block_size, generator, dp_rank, dp_size)]
    # a new memmap per batch: np.memmap holds on to the pages it has read (nanoGPT's leak workaround)
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=token_dtype, mode="r")
    ix = torch.randint(len(data) - block_size, (dp_size * batch_size,), generator=generator)[lo:hi].tolist()
    tokens = np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64)
    check_token_range(tokens, f"{split}.bin")  # cheap per batch, catches what the startup scan skipped
    x, y = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])
    if device_type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# the data position is this generator's state: it is saved in the checkpoint and restored on resume
data_gen = torch.Generator().manual_seed(seed)

# -----------------------------------------------------------------------------
# model
iter_num, best_val_loss, checkpoint = 0, float("inf"), None
model_args = dict(layout=layout, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                  mlp_hidden=mlp_hidden, block_size=block_size, bias=bias, dropout=dropout, qk_norm=qk_norm,
                  tie_embeddings=tie_embeddings, rope_theta=rope_theta, grad_checkpoint=grad_checkpoint,
                  vocab_size=meta.get("vocab_size", 50304), n_expert=n_expert, top_k=top_k,
                  expert_hidden=expert_hidden, moe_every=moe_every, n_shared_expert=n_shared_expert,
                  capacity_factor=capacity_factor, router_score=router_score, router_renormalize=router_renormalize,
                  moe_balance=moe_balance, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, dre=dre,
                  n_prelude=n_prelude, n_coda=n_coda, max_reasoning_steps=max_reasoning_steps,
                  dre_sample_steps=dre_sample_steps, dre_mean_steps=dre_mean_steps,
                  dre_backprop_steps=dre_backprop_steps, dre_threshold=dre_threshold)
run_settings = ("dropout", "grad_checkpoint", "capacity_factor", "aux_loss_coef", "z_loss_coef", "dre_threshold")
if model_args["vocab_size"] > 4096:  # a multiple of 64 makes the head's matmul faster; tiny vocabularies stay as is
    model_args["vocab_size"] = 64 * math.ceil(model_args["vocab_size"] / 64)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
resume_dcp = parallelism.find(out_dir) if init_from == "resume" else None
if resume_dcp and os.path.exists(ckpt_path) and \
        os.path.getmtime(ckpt_path) > os.path.getmtime(os.path.join(resume_dcp, "meta.pt")):
    resume_dcp = None  # a later single-file checkpoint wins
if init_from == "scratch":
    model = GPT(GPTConfig(**model_args))
elif init_from == "resume" and resume_dcp:  # a sharded run's checkpoint: shapes now, contents once parallelized
    checkpoint = torch.load(os.path.join(resume_dcp, "meta.pt"), map_location="cpu", weights_only=True)
    model_args.update({k: v for k, v in checkpoint["model_args"].items() if k not in run_settings})
    model = GPT(GPTConfig(**model_args))
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
elif init_from == "resume" or os.path.isdir(init_from):
    path = ckpt_path if init_from == "resume" else os.path.join(init_from, "ckpt.pt")
    if not os.path.exists(path):
        sys.exit(f"error: init_from={init_from!r} but {path} does not exist")
    if init_from == "resume" and sharded:
        sys.exit(f"error: {path} is a single-file checkpoint; resume it with parallel='none' or 'ddp' (sharded "
                 f"layouts resume from the {parallelism.DCP_DIR}/ their own runs write)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # the architecture comes from the checkpoint; everything else from this run's config
    model_args.update({k: v for k, v in checkpoint["model_args"].items() if k not in run_settings})
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(checkpoint["model"])
    if init_from == "resume":
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
elif init_from.startswith("gpt2"):
    model = GPT.from_pretrained(init_from, dropout=dropout)
    model.config.grad_checkpoint = grad_checkpoint
    model_args = {k: getattr(model.config, k) for k in model_args}
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
        model_args["block_size"] = block_size
else:
    sys.exit(f"error: init_from must be 'scratch', 'resume', 'gpt2*' or a directory holding a ckpt.pt, "
             f"got {init_from!r}")
vocab_size = model.config.vocab_size
if meta.get("vocab_size", 0) > vocab_size:
    sys.exit(f"error: data/{dataset} has vocab_size={meta['vocab_size']} but the model only {vocab_size}")
for split in bin_splits:  # scan whole files up to ~128M tokens up front (a second or so); larger ones per batch
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=token_dtype, mode="r")
    if len(data) <= 2**27:
        check_token_range(data, f"{split}.bin")
model.to(device)
ref_model = None
if mode == "dpo":  # DPO's frozen reference: ref_from's weights, by default those this run started from
    if not ref_from and init_from == "resume":
        ref_from = checkpoint["config"].get("ref_from", "")  # what the interrupted run used
        if not ref_from:
            sys.exit("error: this dpo run started from scratch, so its reference is gone: set ref_from")
    ref_model = constitution.reference_model(ref_from or model, device)
    config["ref_from"] = ref_from or (init_from if os.path.isdir(init_from) else "")
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"parameters: {model.num_params(non_embedding=False) / 1e6:.2f}M "
          f"({model.num_params() / 1e6:.2f}M in matmuls, {model.num_params(active=True) / 1e6:.2f}M of them active "
          f"per token)")

torch.manual_seed(seed + dp_rank)  # dropout: tp ranks of a group draw the same masks on replicated activations
raw_model = model
if compile and not sharded:
    if master:
        print("compiling the model...")
    model = torch.compile(model)
# GPU fsdp: bf16 (or fp16) compute with fp32 gradient reduction; elsewhere autocast does the casting
param_dtype = ptdtype if device_type == "cuda" and "fsdp" in parallel and dtype != "float32" else None
model = parallelism.parallelize(model, parallel, mesh, device_type, param_dtype, fsdp_reshard_after_forward,
                                fsdp_cpu_offload)
if compile and sharded:
    model = torch.compile(model)

scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
optimizers = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer)
if resume_dcp:
    parallelism.load(resume_dcp, raw_model, optimizers)
if init_from == "resume":
    if not resume_dcp:
        for opt, state in zip(optimizers, checkpoint["optimizers"]):
            opt.load_state_dict(state)
    scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint["rng"][rank % len(checkpoint["rng"])]  # each rank's own streams (dropout, data order)
    torch.set_rng_state(rng["torch"])
    if device_type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    np.random.set_state(("MT19937", np.array(rng["numpy"][0], dtype=np.uint32), *rng["numpy"][1:]))
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    data_gen.set_state(rng["data"])
checkpoint = None  # free memory


def rng_states():
    """This rank's random streams: dropout (torch, cuda), numpy, python, and the data order (data_gen)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None,
            "numpy": [np_state[1].tolist(), *np_state[2:]],  # as plain lists: weights_only loading takes no arrays
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "data": data_gen.get_state()}


def save_checkpoint():
    """Called on every rank (it gathers each rank's RNG states); rank 0 writes ckpt.pt atomically: to a temporary
    file first, renamed over the old one only once complete, so a crash mid-save leaves the last one intact.
    Sharded layouts write a distributed checkpoint instead, every rank its own shards (parallel.save)."""
    rngs = [rng_states()]
    if distributed:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng_states())
    if sharded:
        parallelism.save(out_dir, raw_model, optimizers, {
            "model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config,
            "rng": rngs, "scaler": scaler.state_dict()})
        if master:
            print(f"saved distributed checkpoint to {os.path.join(out_dir, parallelism.DCP_DIR)} (iter {iter_num})")
        return
    if not master:
        return
    ckpt = {
        "model": raw_model.state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "scaler": scaler.state_dict(),
        "model_args": model_args,
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": config,
        "rng": rngs,
    }
    tmp = ckpt_path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, ckpt_path)
    print(f"saved checkpoint to {ckpt_path} (iter {iter_num})")


def forward(batch):
    """The loss of a batch, and in dpo mode its preference statistics (accuracy, reward margin, rewards)."""
    if mode == "dpo":
        return constitution.dpo_forward(model, ref_model, *batch, dpo_beta, dpo_soft_labels)
    return model(*batch)[1], {}


dre_eval = {}  # DRE: per split, steps per token and their correlation with the loss at the last evaluation


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches per split (and in dpo mode the mean statistics, as 'val_accuracy' etc.).
    The batches are the same at every evaluation (a generator seeded afresh), which makes successive evaluations
    comparable and leaves the training data stream untouched."""
    out = {}
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
        if raw_model.config.dre:
            dre_eval[split] = raw_model.transformer.recur.metrics()
    model.train()
    if distributed:  # the mean over data-parallel ranks, each of which evaluated its slice of the batches
        keys = sorted(out)
        values = torch.tensor([out[k] for k in keys], device=device)
        dist.all_reduce(values)
        out = dict(zip(keys, (values / world_size).tolist()))
    return out


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


def stop(message, code=1):
    if master:
        print(message)
    parallelism.teardown()
    sys.exit(code)


# SIGTERM / SIGINT: finish the current step, save a checkpoint, exit cleanly
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)

wandb = None
if wandb_log and master:
    try:
        import wandb
    except ImportError:
        sys.exit("error: wandb_log=True needs Weights & Biases: pip install wandb")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a") if master else None


def log(record):
    if master:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if wandb is not None:
            wandb.log(record, step=record["iter"])


# -----------------------------------------------------------------------------
# the loop
flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter / world_size
peak = parallelism.hardware_peak_flops(device_type, ptdtype, peak_flops) if master else 1.0
nonfinite = torch.zeros((), device=device)  # becomes 1 at any non-finite loss; read only at log/eval time
t_log, iters_since_log, start_iter = time.perf_counter(), 0, iter_num
while True:
    lr = get_lr(iter_num)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    if distributed:  # all ranks must agree on stopping, or the others would hang in their next all-reduce
        flags = torch.stack([torch.tensor(float(stop_requested), device=device), nonfinite])
        dist.all_reduce(flags)
        stop_requested, nonfinite = flags[0].item() > 0, flags[1].clamp(max=1)
    evaluate = iter_num % eval_interval == 0 or iter_num == max_iters or eval_only
    if (evaluate or stop_requested or iter_num % log_interval == 0) and nonfinite.item():
        stop(f"error: non-finite loss before iter {iter_num}; stopping before any checkpoint is overwritten (the "
             f"last good one is in {out_dir}). Try a lower learning_rate, grad_clip > 0 or dtype='float32'.")
    if stop_requested:
        save_checkpoint()
        stop(f"stopped by signal at iter {iter_num}", code=0)

    if evaluate:
        losses = estimate_loss()
        if master:
            extra = {k: v for k, v in losses.items() if k not in ("train", "val")}  # dpo: accuracy, margin, ...
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                  + "".join(f", {k} {v:.4f}" for k, v in extra.items() if k.startswith("val_")))
            if dre_eval:  # at dre_threshold: steps per token, core FLOPs, Spearman(steps, loss) (this rank's)
                print(f"  {reasoning.describe(dre_eval['val'])}")
                extra["val_dre"] = dre_eval["val"]
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
        raw_model.transformer.recur.iteration = iter_num
    for micro_step in range(gradient_accumulation_steps):
        parallelism.no_sync(model, parallel, sync=micro_step == gradient_accumulation_steps - 1)
        batch = get_batch("train", data_gen)
        with autocast:
            loss, stats = forward(batch)
            loss = loss / gradient_accumulation_steps
            moe_loss = raw_model.moe_loss() / gradient_accumulation_steps  # MoE balancing losses; 0 if dense
        scaler.scale(loss + moe_loss).backward()
        loss_sum += loss.detach()
        moe_loss_sum += moe_loss.detach()
        for name, value in stats.items():
            stats_sum[name] = stats_sum.get(name, 0.0) + value / gradient_accumulation_steps
    nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss_sum + moe_loss_sum)).float())
    if grad_clip != 0.0:
        for opt in optimizers:
            scaler.unscale_(opt)
        parallelism.clip_grad_norm_(list(model.parameters()), grad_clip)
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if raw_model.config.moe_balance == "bias":
        raw_model.update_moe_bias(moe_bias_rate)
    iter_num += 1
    iters_since_log += 1

    moe = raw_model.moe_metrics() if iter_num % log_interval == 0 else []  # every rank: it resets the counters
    dre_steps = raw_model.transformer.recur.pop_sampled() if raw_model.config.dre and not iter_num % log_interval \
        else []  # the core steps drawn for each micro-batch since the last line
    if distributed and iter_num % log_interval == 0:  # log the global batch's loss, not rank 0's share
        losses = torch.stack([loss_sum, moe_loss_sum])
        dist.all_reduce(losses)
        loss_sum, moe_loss_sum = losses / world_size
    if iter_num % log_interval == 0 and master:
        lossf = loss_sum.item()  # host syncs (this and nonfinite.item()) happen only at log intervals
        now = time.perf_counter()
        dt = (now - t_log) / iters_since_log
        t_log, iters_since_log = now, 0
        tok_s = tokens_per_iter / dt
        mfu = flops_per_iter / dt / peak
        eta = (max_iters - iter_num) * dt
        print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, {tok_s:,.0f} tok/s, "
              f"mfu {mfu * 100:.1f}%, eta {eta / 60:.1f} min")
        record = {"iter": iter_num, "loss": lossf, "lr": lr, "ms": dt * 1000, "tokens_per_sec": tok_s, "mfu": mfu,
                  "eta_s": eta}
        if stats_sum:
            record.update({k: v.item() for k, v in stats_sum.items()})
            print(f"  dpo: accuracy {record['accuracy']:.3f}, reward margin {record['margin']:.4f}, chosen "
                  f"{record['chosen_reward']:.4f}, rejected {record['rejected_reward']:.4f}")
        if moe:  # routing since the last log line; the worst layer is the one to watch
            print(f"  moe: balance {min(m['balance'] for m in moe):.3f} (worst layer), entropy "
                  f"{min(m['entropy_bits'] for m in moe):.2f} bits, dropped {max(m['dropped'] for m in moe):.1%}, "
                  f"aux loss {moe_loss_sum.item():.4f}")
            record.update(moe_loss=moe_loss_sum.item(), moe=moe)
        if dre_steps:
            print(f"  dre: {sum(dre_steps) / len(dre_steps):.2f} core steps per micro-batch"
                  + (" (drawn)" if dre_sample_steps else ""))
            record["dre_steps"] = dre_steps
        log(record)

parallelism.teardown()
