"""
Measures training speed: forward + backward + optimizer step of a model on random tokens, after warm-up.

    python bench.py config/train_shakespeare_char.py
    python bench.py --n_layer=6 --n_embd=384 --block_size=256 --batch_size=64 --dtype=float32,bfloat16

`dtype` and `compile` take comma-separated lists; every combination is measured in the same run, their timings
interleaved round by round so that a noisy machine affects them alike. Prints median ms/iter, tokens/s, MFU and
peak memory (CUDA: allocated by tensors; CPU: the process's peak resident size so far).
"""

import itertools
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch

import configurator
from model import GPT, GPTConfig, hardware_peak_flops

# model and batch, as in train.py (config files for train.py work here; keys bench.py lacks are ignored)
batch_size = 12
block_size = 1024
vocab_size = 50304
layout = "modern"
n_layer = 12
n_head = 12
n_kv_head = 0
n_embd = 768
mlp_hidden = 0
bias = False
qk_norm = False
dropout = 0.0
grad_checkpoint = False
optimizer = "adamw"
learning_rate = 6e-4
weight_decay = 0.1
# what to measure
device = "auto"
dtype = "float32,bfloat16"  # comma-separated list
compile = None              # True, False, or False,True to compare both (None: False)
warmup = 3                  # untimed steps per variant (compile happens here)
rounds = 5                  # timed rounds; each times `steps` steps of every variant
steps = 5
peak_flops = 0.0
seed = 1337

try:
    globals().update(configurator.apply(configurator.hyperparameters(globals()), sys.argv[1:],
                                        skip_unknown_in_files=True))  # train.py's config files have more keys
except configurator.ConfigError as e:
    sys.exit(f"error: {e}")

if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
device_type = device.split(":")[0]
dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" else "float32,bfloat16"
compile_modes = compile if isinstance(compile, tuple) else (bool(compile),)  # --compile=False,True is a tuple
variants = list(itertools.product(dtype.split(","), compile_modes))

torch.manual_seed(seed)
runs = []
for dt, comp in variants:
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, layout=layout, n_layer=n_layer,
                          n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, mlp_hidden=mlp_hidden, bias=bias,
                          qk_norm=qk_norm, dropout=dropout, grad_checkpoint=grad_checkpoint)).to(device)
    opts = model.configure_optimizers(weight_decay, learning_rate, (0.9, 0.95), device_type, optimizer)
    ctx = nullcontext() if dt == "float32" else torch.autocast(device_type, dtype=dtypes[dt])
    fwd = torch.compile(model) if comp else model
    x = torch.randint(vocab_size, (batch_size, block_size + 1), device=device)
    runs.append(dict(name=f"{dt}{' compiled' if comp else ''}", model=model, fwd=fwd, opts=opts, ctx=ctx,
                     dtype=dtypes[dt], x=x[:, :-1], y=x[:, 1:], times=[]))


def step(run):
    with run["ctx"]:
        _, loss = run["fwd"](run["x"], run["y"])
    loss.backward()
    for opt in run["opts"]:
        opt.step()
        opt.zero_grad(set_to_none=True)


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


for run in runs:
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(run)
    sync()
    run["warmup_s"] = time.perf_counter() - t0
for _ in range(rounds):
    for run in runs:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(run)
        sync()
        run["times"].append((time.perf_counter() - t0) / steps)

tokens = batch_size * block_size
print(f"{n_layer} layers x {n_embd} wide, {layout}, batch {batch_size} x {block_size} tokens, {device}, "
      f"{runs[0]['model'].num_params(False) / 1e6:.2f}M parameters, median of {rounds} rounds x {steps} steps")
print(f"{'variant':<22} {'ms/iter':>9} {'tokens/s':>10} {'MFU':>6} {'vs first':>9} {'warm-up s':>10}")
base = statistics.median(runs[0]["times"])
for run in runs:
    t = statistics.median(run["times"])
    mfu = run["model"].flops_per_token(block_size) * tokens / t / hardware_peak_flops(device_type, run["dtype"],
                                                                                     peak_flops)
    print(f"{run['name']:<22} {t * 1000:>9.1f} {tokens / t:>10,.0f} {mfu * 100:>5.1f}% {base / t:>8.2f}x "
          f"{run['warmup_s']:>10.1f}")
if device_type == "cuda":
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB allocated")
else:
    print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB resident (process)")
