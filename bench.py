"""
Benchmarks, one per subcommand; after it come config files and --key=value, as train.py takes them (keys bench.py
lacks are ignored in files). With none (or `throughput`): training speed, forward + backward + optimizer step on
random tokens, after warm-up, of the model GPTConfig's settings describe (--dre=True: a DRE model).

    python bench.py           # the CPU default, config/train_shakespeare_char.py: about a minute on a CPU
    python bench.py config/train_gpt2.py   # GPT-2 124M (hours on a CPU)
    python bench.py --n_layer=6 --n_embd=384 --block_size=256 --batch_size=64 --dtype=float32,bfloat16
    python bench.py moe       # one MoE layer by each moe_kernel path, a naive loop, and a dense MLP of equal FLOPs
    python bench.py memory config/tiny.py  # per-rank bytes of params, grads, optimizer under each parallel layout
    python bench.py memory config/shakespeare_char_moe.py   # MoE models add expert-parallel (ep_size) rows
    python bench.py depth --out_dir=out-shakespeare-char-dre   # a DRE checkpoint at fixed and adaptive depths
    python bench.py reasoning --out_dir=out-reasoning-dre   # accuracy per difficulty vs core steps, exit, speed

`dtype`, `compile`, `optimizer` and (MoE models) `moe_kernel` take comma-separated lists: every combination is
measured in the same run (`--optimizer=adamw,muon`: what Muon's step costs). `--json_out=FILE` also writes the rows.
"""

import dataclasses
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import configurator
import data
import evaluation
import hardware
import parallel
from checkpoint import CheckpointError
from convert import load_run
from model import GPT, MLP, GPTConfig
from moe import MoE, local, sync_expert_grads

# bench.py's own settings; the model's are GPTConfig's fields (--n_layer=6), read from `config` below
dataset = ""                # as in train.py: vocab_size from data/<dataset>/meta.json when it exists
batch_size = 12
optimizer = "adamw"         # or muon, or adamw,muon for both
learning_rate = 6e-4
weight_decay = 0.1
device = "auto"
dtype = "float32,bfloat16"
compile = None              # True, False, or False,True to compare both
warmup = 3                  # untimed steps per variant (compile happens here)
rounds = 5                  # timed rounds; each times `steps` steps of every variant
steps = 5
peak_flops = 0.0            # the MFU denominator; 0: hardware.hardware_peak_flops
json_out = ""               # throughput: also write the measured rows to this JSON file
seed = 1337
# moe: one layer on moe_tokens tokens of width moe_embd, 8 experts (or n_expert) of moe_hidden, top_k of them
moe_tokens = 4096
moe_embd = 256
moe_hidden = 1024
# memory: one step of each parallel.py layout on 2 CPU processes (4 for fsdp+tp); on GPUs: train.py --dry_run=N
memory_layout = ""          # set for the worker processes bench.py starts itself
tp_size = 2
ep_size = 2                 # the expert-parallel rows' group size (MoE models): ddp or fsdp with ep_size ranks a group
pp_size = 2                 # the pipeline rows' stages
# depth: out_dir's DRE checkpoint at core steps 1..max_reasoning_steps and at each of dre_thresholds
out_dir = "out"
dre_thresholds = "3e-4,1e-3,3e-3,1e-2"  # KL between successive steps' predictions, nats
dre_eval_batches = 20       # val batches of the checkpoint's batch_size x block_size
dre_new_tokens = 200        # tokens generated per timed round
# reasoning: out_dir's model on its dataset's test.jsonl (data/reasoning/prepare.py), at fixed core steps 1 ..
# reasoning_max_factor x the training mean and with exit by dre_threshold (the checkpoint's unless set here)
reasoning_test = ""         # default: data/<the run's dataset>/test.jsonl
reasoning_max_factor = 4
reasoning_per = 100         # test problems per difficulty (the first of each in the file)
reasoning_threshold = -1.0  # < 0: the checkpoint's dre_threshold
reasoning_exit = ""         # '', 'kl' or 'state': the checkpoint's dre_exit unless set
reasoning_plot = ""         # default: out_dir/reasoning.png

# the settings each subcommand uses ("model": GPTConfig's), each checked before anything is measured
USES = {
    "throughput": "model batch_size optimizer learning_rate device dtype compile warmup rounds steps peak_flops "
                  "json_out",
    "moe": "moe_tokens moe_embd moe_hidden device dtype warmup rounds steps",
    "memory": "model learning_rate tp_size ep_size pp_size memory_layout",
    "depth": "dre_thresholds dre_eval_batches dre_new_tokens device dtype rounds",
    "reasoning": "reasoning_max_factor reasoning_per reasoning_exit device rounds",
}
# the switches of the old command line, now subcommands (--dre=True is the model setting: a DRE model's speed)
MOVED = {"--memory": "memory", "--moe": "moe", "--dre": "depth", "--reasoning": "reasoning"}

own = configurator.hyperparameters(globals())  # the settings above
args = sys.argv[1:]
mode = args.pop(0) if args and args[0] in USES else "throughput"
if args and args[0] == "estimate" or "--estimate" in args:  # arithmetic that nothing checked: replaced
    sys.exit("error: bench.py estimate is replaced by the dry run, which runs the real step at full size on this "
             "CPU: python train.py CONFIG --dry_run=N [--parallel=... --tp_size=... --pp_size=...]")
if args and args[0].isidentifier():  # a word where a config file or --key=value goes: a mistyped subcommand
    sys.exit(f"error: unknown subcommand {args[0]!r}; the subcommands are {', '.join(USES)} (none: throughput)")
for flag, new in MOVED.items():
    if flag in args:
        sys.exit(f"error: {flag} is now a subcommand: python bench.py {new} ...")
if mode == "throughput" and not args:  # the CPU default config (its dataset has 65 characters)
    args = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "train_shakespeare_char.py"),
            "--vocab_size=65"]
try:
    settings = configurator.apply({**GPTConfig.defaults(), **own}, args, skip_unknown_in_files=True)
except configurator.ConfigError as e:
    sys.exit(f"error: {e}")
globals().update({k: settings[k] for k in own})  # bench.py's own; the model's stay in settings

# what is wrong with each setting that cannot work; the subcommand's own are then checked, one line naming the first
wrong = {name: f"{name} must be at least 1, got {settings[name]}" for name in (
    "batch_size", "rounds", "steps", "moe_tokens", "moe_embd", "moe_hidden", "tp_size", "ep_size", "pp_size",
    "dre_eval_batches", "dre_new_tokens", "reasoning_max_factor",
    "reasoning_per") if settings[name] < 1}
try:
    thresholds = [float(t) for t in dre_thresholds.split(",")]
except ValueError:
    thresholds = [-1.0]
for name, bad, message in [
    ("warmup", warmup < 0, f"warmup must be >= 0, got {warmup}"),
    ("dtype", dtype != "auto" and not set(dtype.split(",")) <= {"float32", "bfloat16", "float16"},
     f"dtype must be a comma-separated list of float32, bfloat16, float16 (or 'auto'), got {dtype!r}"),
    ("compile", not all(type(c) is bool for c in (compile if isinstance(compile, tuple) else (bool(compile),))),
     f"compile must be True, False or a list of them (False,True), got {compile!r}"),
    ("optimizer", not set(optimizer.split(",")) <= {"adamw", "muon"},
     f"optimizer must be 'adamw', 'muon' or both ('adamw,muon'), got {optimizer!r}"),
    ("learning_rate", not learning_rate > 0 or weight_decay < 0,
     f"learning_rate must be > 0 and weight_decay >= 0, got {learning_rate}, {weight_decay}"),
    ("peak_flops", peak_flops < 0, f"peak_flops must be >= 0 (0 measures it), got {peak_flops}"),
    ("dre_thresholds", min(thresholds) < 0,
     f"dre_thresholds must be comma-separated numbers >= 0, got {dre_thresholds!r}"),
    ("reasoning_exit", reasoning_exit not in ("", "kl", "state"),
     f"reasoning_exit must be '', 'kl' or 'state', got {reasoning_exit!r}"),
    ("memory_layout", memory_layout not in ("", *parallel.LAYOUTS), f"memory_layout must be one of {parallel.LAYOUTS}"),
]:
    if bad:
        wrong.setdefault(name, message)
uses = USES[mode].split()
for name in uses:
    if name in wrong:
        sys.exit(f"error: {wrong[name]}")
config = None  # the model: GPTConfig of the settings; moe: one layer's, of 8 experts unless n_expert is set
moe_kernels = settings["moe_kernel"].split(",")  # throughput: a list, each checked as GPTConfig checks one
try:
    if "model" in uses:
        for kernel in moe_kernels[1:]:
            GPTConfig.from_settings({**settings, "moe_kernel": kernel})
        settings["moe_kernel"] = moe_kernels[0]
        if dataset and settings["vocab_size"] == GPTConfig.vocab_size:  # unless --vocab_size is given
            settings["vocab_size"] = data.read_meta(os.path.join("data", dataset)).get("vocab_size",
                                                                                        GPTConfig.vocab_size)
        config = GPTConfig.from_settings(settings)
    if mode == "moe":
        config = GPTConfig(n_layer=1, n_head=1, n_embd=moe_embd, n_expert=settings["n_expert"] or 8,
                           top_k=settings["top_k"], expert_hidden=moe_hidden)
    device = hardware.pick_device(device) if "device" in uses else "cpu"
except ValueError as e:
    sys.exit(f"error: {e}")
device_type = device.split(":")[0]
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" else "float32,bfloat16"
if "float16" in dtype.split(",") and device_type == "cpu" and "dtype" in uses:
    sys.exit("error: dtype float16 is not supported on the CPU; use float32 or bfloat16")
torch.manual_seed(seed)


def timed(cases, fn, calls, n_rounds=rounds, skip=0, what="round"):
    """Median seconds of `calls` calls of fn(case) for each case, over n_rounds rounds after `skip` untimed ones.
    The cases take turns within each round, so that a noisy machine slows them alike. A line to stderr per round."""
    times = [[] for _ in cases]
    for i in range(skip + n_rounds):
        label = "untimed" if i < skip else f"{i - skip + 1}/{n_rounds}"
        print(f"  {what} {label}: {len(cases)} case{'s' * (len(cases) > 1)} x {calls} call{'s' * (calls > 1)}...",
              file=sys.stderr, flush=True)
        for case, t in zip(cases, times):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(case)
            if device_type == "cuda":
                torch.cuda.synchronize()
            t.append(time.perf_counter() - t0)
    return [np.median(t[skip:]) for t in times]


def bench_throughput():
    compile_modes = compile if isinstance(compile, tuple) else (bool(compile),)  # --compile=False,True is a tuple
    T = config.block_size
    x = torch.randint(config.vocab_size, (batch_size, T + 1), device=device)  # every variant's batch
    runs = []
    optimizers = optimizer.split(",")
    kernels = moe_kernels if config.n_expert else moe_kernels[:1]
    for dt, comp, opt, kernel in itertools.product(dtype.split(","), compile_modes, optimizers, kernels):
        model = GPT(dataclasses.replace(config, moe_kernel=kernel)).to(device)
        opts = model.configure_optimizers(weight_decay, learning_rate, (0.9, 0.95), device_type, opt)
        name = f"{dt}{' compiled' if comp else ''}{f' {opt}' if len(optimizers) > 1 else ''}"
        name += f" {kernel}" if len(kernels) > 1 else ""
        runs.append(dict(name=name, model=model, opts=opts, ctx=hardware.autocast(device_type, dt),
                         fwd=parallel.compile_blocks(model) if comp else model, dtype=getattr(torch, dt)))

    def step(run):
        with run["ctx"]:
            _, loss = run["fwd"](x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in run["opts"]:
            opt.step()
            opt.zero_grad()

    warmup_s = timed(runs, step, warmup, n_rounds=1, what="warm-up")
    times = [t / steps for t in timed(runs, step, steps)]
    tokens = batch_size * T
    print(f"{config.n_layer} layers x {config.n_embd} wide, {config.layout}, batch {batch_size} x {T} tokens, "
          f"{device}, {runs[0]['model'].num_params(False) / 1e6:.2f}M parameters, median of {rounds} rounds x "
          f"{steps} steps")
    print(f"{'variant':<22} {'ms/iter':>9} {'tokens/s':>10} {'MFU':>6} {'vs first':>9} {'warm-up s':>10}")
    rows = []
    for run, t, w in zip(runs, times, warmup_s):
        peak = hardware.hardware_peak_flops(device_type, run["dtype"], peak_flops)
        mfu = run["model"].flops_per_token(T) * tokens / t / peak
        print(f"{run['name']:<22} {t * 1000:>9.1f} {tokens / t:>10,.0f} {mfu:>6.1%} {times[0] / t:>8.2f}x {w:>10.1f}")
        rows.append(dict(variant=run["name"], ms_per_iter=t * 1000, tokens_per_s=tokens / t, mfu=mfu, warmup_s=w))
    cuda = device_type == "cuda"
    peak_mib = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                * 1024) / 2**20
    print("peak memory:", f"{peak_mib:,.0f} MiB {'allocated' if cuda else 'resident (process)'}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(dict(params=runs[0]["model"].num_params(False), tokens_per_iter=tokens, peak_mib=peak_mib,
                           rows=rows), f, indent=1)


def naive_moe(layer, x):
    """The MoE layer as it is usually first written: a Python loop over experts, index_select and index_add."""
    expert, weight, _, _ = layer.route(x)  # moe.py's routing: the same experts and weights
    out = torch.zeros_like(x)
    for e in range(layer.n_expert):
        token, slot = (expert == e).nonzero(as_tuple=True)
        xe = x.index_select(0, token)
        ye = (F.silu(xe @ layer.w13[e, 0].t()) * (xe @ layer.w13[e, 1].t())) @ layer.w2[e].t()
        out.index_add_(0, token, (ye * weight[token, slot, None]).to(out.dtype))
    return out


def every_expert_moe(layer, x):
    """Every expert on every token, the unchosen ones weighted by zero: no dispatch, but n_expert/top_k the FLOPs."""
    expert, weight, _, _ = layer.route(x)
    gates = weight.new_zeros(len(x), layer.n_expert).scatter(1, expert, weight)
    h = F.silu(torch.einsum("nd,ehd->enh", x, layer.w13[:, 0])) * torch.einsum("nd,ehd->enh", x, layer.w13[:, 1])
    return torch.einsum("ne,end->nd", gates.to(h.dtype), torch.einsum("enh,edh->end", h, layer.w2))


def bench_moe():
    """Forward + backward of one MoE layer by each of moe.py's kernel paths (moe_kernel) that runs here, against
    the naive loop, every expert on every token, and a dense SwiGLU of the same FLOPs; a path that cannot run on
    this device and dtype is listed with the reason."""
    top_k = config.top_k
    layer = MoE(config).to(device)
    dense = MLP(config, hidden=top_k * moe_hidden).to(device)  # a dense SwiGLU with the FLOPs of top_k experts
    x = torch.randn(moe_tokens, moe_embd, device=device, requires_grad=True)
    grad = torch.randn(moe_tokens, moe_embd, device=device)

    def moe_path(kernel):
        def run():
            layer.kernel = kernel
            return layer(x.view(1, -1, moe_embd)).view(-1, moe_embd)
        return run

    impls = [(f"moe.py, moe_kernel={k}", moe_path(k)) for k in ("grouped_mm", "triton", "loop")]
    impls += [("naive loop over experts", lambda: naive_moe(layer, x)),
              ("every expert on every token", lambda: every_expert_moe(layer, x)),
              (f"dense SwiGLU, {top_k * moe_hidden} wide", lambda: dense(x))]

    def fwd_bwd(case):
        with hardware.autocast(device_type, case[1]):
            out = case[2]()
        out.backward(grad)

    cases, skipped = [], {}
    for dt in dtype.split(","):
        for name, fn in impls:
            if "triton" in name and device_type != "cuda":  # the interpreter runs it, at a snail's pace
                skipped[name, dt] = "needs CUDA"
                continue
            try:
                fwd_bwd((name, dt, fn))
                cases.append((name, dt, fn))
            except (ValueError, RuntimeError) as e:
                skipped[name, dt] = str(e).splitlines()[0].split("; ")[0][:70]
    times = {case[:2]: t / steps for case, t in zip(cases, timed(cases, fwd_bwd, steps, skip=warmup))}
    print(f"MoE layer: {moe_tokens} tokens x {moe_embd} wide, {config.n_expert} experts of {moe_hidden}, top-{top_k}, "
          f"{device}; forward + backward, median of {rounds} rounds x {steps}")
    print(f"{'implementation':<32} {'dtype':<9} {'ms':>8} {'vs dense':>9}")
    for dt in dtype.split(","):
        for name, _ in impls:
            if (name, dt) in times:
                t = times[name, dt]
                print(f"{name:<32} {dt:<9} {t * 1000:>8.1f} {t / times[impls[-1][0], dt]:>8.2f}x")
            else:
                print(f"{name:<32} {dt:<9} {'n/a':>8}  {skipped[name, dt]}")


def bench_memory():  # one torchrun per layout, rank 0 reporting the largest rank's bytes
    n_layer, n_expert = config.n_layer, config.n_expert
    with torch.device("meta"):
        n = GPT(config).num_params(non_embedding=False)
    print(f"{n_layer} layers x {config.n_embd} wide{f', {n_expert} experts' if n_expert else ''}: {n / 1e6:.1f}M "
          f"parameters, fp32 + AdamW; MiB per rank, measured on the CPU (gloo)")
    print(f"{'layout':<10} {'ranks':>5} {'params':>9} {'grads':>9} {'optimizer':>10} {'total':>9} {'vs none':>8}")
    base = None
    rows = [(name, name, ranks, 1, 1) for name, ranks in (("none", 1), ("ddp", 2), ("fsdp", 2), ("tp", 2),
                                                          ("fsdp+tp", 4))]
    if n_expert:  # expert parallelism on ep_size ranks: the experts split between them, the rest as the layout says
        rows += [(f"{name}, ep {ep_size}", name, ep_size, ep_size, 1) for name in ("ddp", "fsdp")]
    # pipeline: pp_size stages, alone and with fsdp over 2 ranks a stage (the largest stage is what has to fit)
    if pp_size > 1 and n_layer % pp_size == 0:
        rows += [(f"pp {pp_size}", "none", pp_size, 1, pp_size),
                 (f"fsdp, pp {pp_size}", "fsdp", 2 * pp_size, 1, pp_size)]
    for name, layout, ranks, ep, pp in rows:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
               *sys.argv[1:], f"--memory_layout={layout}", f"--ep_size={ep}", f"--pp_size={pp}"]
        print(f"  {name} on {ranks} process{'es' * (ranks > 1)}...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode:
            print(f"{name:<10} {ranks:>5}  failed: "
                  f"{(proc.stdout + proc.stderr).strip().splitlines()[-1]}", flush=True)
            continue
        p, g, o = (float(v) / 2**20 for v in proc.stdout.split()[-3:])  # the worker's last line
        base = base or p + g + o
        print(f"{name:<10} {ranks:>5} {p:>9.1f} {g:>9.1f} {o:>10.1f} {p + g + o:>9.1f} {(p + g + o) / base:>7.2f}x",
              flush=True)


def memory_worker():
    rank, _, world, _ = parallel.init_distributed("cpu")
    model = GPT(config)  # the same seeded weights on every rank
    mesh, _, _ = parallel.mesh_and_ranks(memory_layout, tp_size, world, "cpu", pp_size)
    T = min(config.block_size, 64)
    x = torch.randint(config.vocab_size, (pp_size, T + 1))  # pipeline: one sequence per micro-batch, one per stage
    pipeline = dict(schedule="1F1B", microbatches=pp_size, virtual=1, accumulation=1, batch=pp_size, seq_len=T)
    wrapped = parallel.parallelize(model, memory_layout, mesh, "cpu", ep_size=ep_size,
                                   pipeline=pipeline if pp_size > 1 else None)
    opt = model.configure_optimizers(weight_decay, learning_rate, (0.9, 0.95), "cpu", "adamw",
                                     parallel.optimizer_kwargs(model, "cpu"))[0]
    _, loss = wrapped(x[:, :-1], x[:, 1:])  # train.py's step, which every layout (a pipeline too) answers alike
    wrapped.backward(loss + wrapped.moe_loss())
    sync_expert_grads(model)
    wrapped.finish_backward()
    opt.step()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    sizes = torch.tensor([sum(local(t).nbytes for t in tensors) for tensors in (model.parameters(), grads, state)],
                         dtype=torch.float64)  # local shards only
    torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)  # the largest rank is what has to fit
    if rank == 0:
        print(*sizes.tolist())
    parallel.teardown()


def bench_depth():
    path = os.path.join(out_dir, "ckpt.pt")
    try:
        model, _, run_cfg = load_run(out_dir)
    except FileNotFoundError as e:  # none, or older than the run's distributed checkpoint
        sys.exit(f"error: {e} (a DRE model: python train.py config/shakespeare_char_dre.py)")
    except CheckpointError as e:
        sys.exit(f"error: out_dir={out_dir!r}: {e}")
    if not model.config.dre:
        sys.exit(f"error: {path} is not a DRE model (it was trained with dre=False)")
    model.to(device)
    cfg, recur = model.config, model.depth
    data_dir = os.path.join("data", run_cfg["dataset"])
    with open(os.path.join(data_dir, "meta.json")) as f:
        val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=json.load(f).get("dtype", "uint16"), mode="r")
    B, T = run_cfg["batch_size"], cfg.block_size
    starts = torch.randint(len(val) - T, (dre_eval_batches, B, 1), generator=torch.Generator().manual_seed(seed))
    batches = torch.from_numpy(val[starts.numpy() + np.arange(T + 1)].astype(np.int64)).to(device)  # (n, B, T + 1)
    prompt = torch.from_numpy(val[:32].astype(np.int64))[None].to(device)
    dt, S = dtype.split(",")[0], cfg.max_reasoning_steps
    depths = [(f"{r} step{'s' * (r > 1)}", r, 0.0) for r in range(1, S + 1)]  # (name, core steps, threshold)
    depths += [(f"threshold {t}", S, float(t)) for t in dre_thresholds.split(",")]
    rows = {}

    def generate(depth):  # batch 1, the same seed for every depth
        name, r, t = depth
        torch.manual_seed(seed)
        model.generate(prompt, dre_new_tokens, temperature=0.8, top_k=200, observe=recur.observe, steps=r, threshold=t)
        rows[name]["gen_steps"] = recur.metrics()["mean_steps"]

    with torch.no_grad(), hardware.autocast(device_type, dt):
        for name, r, t in depths:  # each token's steps and loss
            print(f"  val loss at {name}...", file=sys.stderr, flush=True)
            losses = []
            for b in batches:
                logits, loss = model(b[:, :-1], b[:, 1:], steps=r, threshold=t)
                recur.observe(logits, b[:, 1:])
                losses.append(loss.item())
            rows[name] = dict(loss=sum(losses) / len(losses), **recur.metrics())
        gen_s = timed(depths, generate, 1, skip=1, what="generation round")
    print(f"DRE checkpoint {path}: {cfg.n_prelude} prelude + {recur.n_core} core + {cfg.n_coda} coda blocks, "
          f"{cfg.n_embd} wide, trained with mean {cfg.dre_mean_steps:g} core steps; {device}, {dt}")
    print(f"val: {dre_eval_batches} batches of {B} x {T} tokens. generation: batch 1, {dre_new_tokens} tokens after a "
          f"32-token prompt, median of {rounds} rounds")
    print(f"{'core steps':<16} {'val loss':>9} {'vs max':>7} {'steps/token':>12} {'core compute':>13} "
          f"{'core MFLOPs/tok':>16} {'Spearman':>9} {'gen steps':>10} {'gen tok/s':>10} {'vs max':>7}")
    top, top_tok_s = rows[depths[S - 1][0]], dre_new_tokens / gen_s[S - 1]
    for (name, _, _), t in zip(depths, gen_s):
        row, tok_s = rows[name], dre_new_tokens / t
        # Spearman's rho is undefined when every token took the same steps: a blank, not nan
        rho = f"{row['spearman']:>+9.3f}" if math.isfinite(row["spearman"]) else " " * 9
        print(f"{name:<16} {row['loss']:>9.4f} {row['loss'] / top['loss'] - 1:>+7.2%} {row['mean_steps']:>12.2f} "
              f"{row['mean_steps'] / S:>13.0%} {row['core_flops_per_token'] / 1e6:>16.2f} {rho} "
              f"{row['gen_steps']:>10.2f} {tok_s:>10,.0f} {tok_s / top_tok_s:>6.2f}x")


def bench_reasoning():
    try:  # the exit test is a setting of the model's: built with the one asked for
        model, _, run_cfg = load_run(out_dir, **({"dre_exit": reasoning_exit} if reasoning_exit else {}))
    except FileNotFoundError as e:
        sys.exit(f"error: {e} (python data/reasoning/prepare.py && python train.py config/reasoning_dre.py)")
    except CheckpointError as e:
        sys.exit(f"error: out_dir={out_dir!r}: {e}")
    data_dir = os.path.join("data", run_cfg["dataset"])
    test_path = reasoning_test or os.path.join(data_dir, "test.jsonl")
    select_path = os.path.join(data_dir, "select.jsonl")  # where the step count ood_acc reports is chosen
    try:
        meta = data.read_meta(data_dir)
        problems, tokenizer = evaluation.load_problems(test_path, reasoning_per), data.Tokenizer(meta)
        select = evaluation.load_problems(select_path, reasoning_per) if os.path.exists(select_path) else []
        train_max = meta["train_max"]
        for p in problems + select:  # the answer, then what must follow it (addition: a newline)
            p["ids"], p["target"] = tokenizer.encode(p["prompt"]), tokenizer.encode(p["answer"] + meta["answer_end"])
            p["answer_at"] = (0, len(tokenizer.encode(p["answer"])))
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: the reasoning test set ({test_path}, {data_dir}/meta.json): {type(e).__name__}: {e}; "
                 f"prepare it with python data/reasoning/prepare.py")
    model.to(device)
    threshold = reasoning_threshold if reasoning_threshold >= 0 else model.config.dre_threshold
    mean = model.config.dre_mean_steps if model.config.dre else 1
    top = math.ceil(reasoning_max_factor * mean)  # every count up to the training maximum, then every other one
    limit = model.config.max_reasoning_steps if model.config.dre else 1
    counts = sorted({*range(1, min(limit, top) + 1), *range(limit, top + 1, 2), top})
    rows, summary = evaluation.benchmark(model, problems, train_max, counts, threshold, select, rounds=rounds)
    diffs = sorted({p["difficulty"] for p in problems})
    print(f"{out_dir}: {'DRE' if model.config.dre else 'dense'} model, {model.config.n_layer} blocks x "
          f"{model.config.n_embd}, trained on difficulty 1-{train_max}{f' at mean {mean:g} core steps' * (mean > 1)}; "
          f"{len(problems)} problems of {test_path}; exact-match accuracy per difficulty ({device})")
    print(f"{'core steps':<18}" + "".join(f"{d:>6}" for d in diffs) + f"{'all':>7}{'steps/ans':>10}"
          f"{'MFLOPs/tok':>11}{'gen tok/s':>10}")
    for name, row in rows.items():
        steps = sum(row["steps"].values()) / len(row["steps"])
        extra = f"{row['flops'] / 1e6:>11.2f}{row['tok_s']:>10,.0f}" if row["tok_s"] else ""
        print(f"{name:<18}" + "".join(f"{row['acc'][d]:>6.0%}" for d in diffs) + f"{row['all']:>7.1%}"
              f"{steps:>10.2f}{extra}")
    plot_path = reasoning_plot or os.path.join(out_dir, "reasoning.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
    else:
        fixed = [(r, rows[f"{r} steps"]) for r in (counts if model.config.dre else [1])]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for d in diffs:
            ax.plot([r for r, _ in fixed], [row["acc"][d] for _, row in fixed], marker="o", label=f"difficulty {d}",
                    linestyle="-" if d <= train_max else "--")
        ax.set(xlabel="core steps", ylabel="exact-match accuracy", ylim=(-0.02, 1.02),
               title=f"{out_dir} (dashed: harder than training)")
        ax.legend(fontsize=7)
        fig.savefig(plot_path, dpi=120, bbox_inches="tight")
        print(f"plot: {plot_path}")
    if not select:
        print(f"note: no {select_path} (data prepared before it was written): ood_acc's step count was chosen on "
              f"the test problems themselves; prepare the data again for a fair one")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))


if memory_layout:
    memory_worker()
else:
    {"throughput": bench_throughput, "moe": bench_moe, "memory": bench_memory,
     "depth": bench_depth, "reasoning": bench_reasoning}[mode]()
