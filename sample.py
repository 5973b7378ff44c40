"""
Generates text from a trained model (out_dir/ckpt.pt) or from OpenAI's GPT-2 weights:

    python sample.py --out_dir=out-shakespeare-char --max_new_tokens=200
    python sample.py --init_from=gpt2 --start="What is the answer to life?" --num_samples=2
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --top_p=0.9
"""

import os
import sys
import time

import torch

import configurator
import data
import hardware
import reasoning
from checkpoint import newest
from convert import load_run

init_from = "resume"     # 'resume' (from out_dir), a GPT-2 variant ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
                         # or 'hf:FOLDER', a local Hugging Face folder (convert.py), with its own tokenizer
out_dir = "out"          # the run directory to load ckpt.pt from
start = "\n"             # the prompt; "FILE:path" reads it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8        # 1.0 samples the model's distribution, < 1 sharpens it, 0 is greedy
top_k = 200              # sample from the k most likely tokens only; 0 disables
top_p = 1.0              # sample from the smallest set of tokens holding this much probability; 1.0 disables
seed = 1337
device = "auto"
dtype = "auto"           # 'float32' or 'bfloat16'/'float16' autocast; auto: bf16 on capable GPUs, fp32 elsewhere
compile = False
dre_threshold = None     # DRE models: a token stops once its prediction moves less than this (KL); None: the model's
max_reasoning_steps = None  # DRE models: the most core steps a token runs; None: the model's
try:
    globals().update(configurator.apply(configurator.hyperparameters(globals()), sys.argv[1:],
                                        skip_unknown_in_files=True))
except configurator.ConfigError as e:
    sys.exit(f"error: {e}")
# every setting checked before a model is loaded: one line naming it
for bad, message in [
    (init_from != "resume" and not init_from.startswith(("gpt2", "hf:")),
     f"init_from must be 'resume' (from out_dir), 'gpt2*' or 'hf:FOLDER', got {init_from!r}"),
    (num_samples < 1, f"num_samples must be at least 1, got {num_samples}"),
    (max_new_tokens < 1, f"max_new_tokens must be at least 1, got {max_new_tokens}"),
    (temperature < 0, f"temperature must be >= 0 (0 is greedy), got {temperature}"),
    (top_k < 0, f"top_k must be >= 0 (0 disables it), got {top_k}"),
    (not 0 < top_p <= 1, f"top_p is a probability in (0, 1] (1.0 disables it), got {top_p}"),
    (dtype not in ("auto", "float32", "bfloat16", "float16"),
     f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}"),
    (dre_threshold is not None and not (isinstance(dre_threshold, (int, float)) and dre_threshold >= 0),
     f"dre_threshold must be a number >= 0 (or None: the model's), got {dre_threshold!r}"),
    (max_reasoning_steps is not None and not (type(max_reasoning_steps) is int and max_reasoning_steps >= 1),
     f"max_reasoning_steps must be an int >= 1 (or None: the model's), got {max_reasoning_steps!r}"),
    (start.startswith("FILE:") and not os.path.isfile(start[5:]), f"start={start!r}: no such file {start[5:]!r}"),
]:
    if bad:
        sys.exit(f"error: {message}")
try:
    device = hardware.pick_device(device)
    dtype = hardware.pick_dtype(dtype, device.split(":")[0])[0]
except ValueError as e:
    sys.exit(f"error: {e}")
device_type = device.split(":")[0]
autocast = hardware.autocast(device_type, dtype)
torch.manual_seed(seed)

try:
    model, tokenizer, run_config = load_run(out_dir if init_from == "resume" else init_from, device)
except FileNotFoundError as e:
    sys.exit(f"error: {e}" + " (or pass --init_from=gpt2)" * (init_from == "resume"))
except (ValueError, ImportError) as e:
    sys.exit(f"error: {'out_dir=' + repr(out_dir) if init_from == 'resume' else 'init_from=' + repr(init_from)}: {e}")
chat_tuned = run_config.get("mode", "pretrain") != "pretrain"  # sft/dpo: a sample ends at the template's END
if init_from == "resume":
    print(f"sampling {newest(out_dir)[1]}", file=sys.stderr)  # the run's later checkpoint, by iteration
if dre_threshold is None:  # DRE models: the exit this sampling asks for, passed to generate (dense ones ignore it)
    dre_threshold = model.config.dre_threshold
raw_model = model
if compile:  # what generate runs for each new token (dynamic: the context and the cache grow)
    raw_model.hidden = torch.compile(raw_model.hidden, dynamic=True)
# DRE models: each generated token's core steps against its surprisal, for the line at the end
observe = raw_model.depth.observe if raw_model.config.dre else None

if start.startswith("FILE:"):
    with open(start[5:], encoding="utf-8") as f:
        start = f.read()
try:
    start_ids = tokenizer.encode(start, special=True) or [tokenizer.spec.get("eot_id") or 0]
except ValueError as e:
    sys.exit(f"error: the prompt has {e}")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]
stop = (lambda idx: data.END in tokenizer.decode(idx[0, x.size(1):].tolist())) if chat_tuned else None

new_tokens, seconds = 0, 0.0
with torch.no_grad(), autocast:
    for _ in range(num_samples):
        t0 = time.perf_counter()
        y = raw_model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                               observe=observe, stop=stop, steps=max_reasoning_steps, threshold=dre_threshold)
        if device_type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        new_tokens += y.size(1) - x.size(1)
        print(tokenizer.decode(y[0].tolist()))
        print("---------------")
print(f"{new_tokens} tokens in {seconds:.2f} s: {new_tokens / seconds:,.0f} tokens/s "
      f"(batch 1, KV cache, {device}, {dtype})")
if observe is not None:  # at dre_threshold; "loss" is each sampled token's surprisal
    print(f"{reasoning.describe(raw_model.depth.metrics(max_reasoning_steps))} (dre_threshold {dre_threshold})")
