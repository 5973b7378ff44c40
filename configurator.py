"""
Overrides the globals of a script (train.py, sample.py, bench.py) from the command line, in nanoGPT's manner:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Positional arguments are Python files run in order, then `--key=value` (parsed with ast.literal_eval, else kept as a
string; a bare `--flag` sets a bool). Unlike nanoGPT's it checks: an unknown key is an error naming the closest known
one, and a value must have its default's type (an int passes for a float; a None default accepts anything).
Also here: train.py's checks of its settings, and what 'auto' means on this machine for device, dtype and the peak
FLOP/s that MFU is measured against.
"""

import ast
import difflib
import functools
import os
import time
import timeit
import traceback
import types

import torch


class ConfigError(ValueError):
    pass


def _unknown(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _check_type(key, value, default, source):
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    raise ConfigError(f"{source}: {key}={value!r} is a {type(value).__name__}, expected {type(default).__name__} "
                      f"(default {default!r})")


def apply(config, argv, skip_unknown_in_files=False):
    """Updates the dict `config` (a script's globals, filtered to its hyperparameters) from argv; returns it.
    skip_unknown_in_files lets a script with fewer knobs (bench.py, sample.py) read train.py's config files."""
    defaults = dict(config)
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: run it in a namespace that starts as the current config, so it may read earlier values
            namespace = dict(config)
            try:
                with open(arg) as f:
                    code = compile(f.read(), arg, "exec")
            except FileNotFoundError:
                raise ConfigError(f"config file not found: {arg}") from None
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"config file {arg} cannot be read: {e}") from None
            except SyntaxError as e:
                raise ConfigError(f"{arg}, line {e.lineno}: syntax error: {e.msg}; fix the file "
                                  f"(a config file is Python: key = value lines)") from None
            try:
                exec(code, namespace)
            except Exception as e:  # the file's own line, not configurator's
                line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                             if f.filename == arg), "?")
                raise ConfigError(f"{arg}, line {line}: {type(e).__name__}: {e}") from None
            for key, value in namespace.items():
                if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue
                if key not in defaults:
                    if skip_unknown_in_files:
                        continue
                    raise _unknown(key, list(defaults)) from None
                config[key] = _check_type(key, value, defaults[key], arg)
        else:
            key, sep, text = arg[2:].partition("=")  # partition: the value itself may contain '='
            if key not in defaults:
                raise _unknown(key, list(defaults))
            if not sep:  # a bare --flag switches a bool on (bench.py --moe); anything else needs a value
                if not isinstance(defaults[key], bool):
                    raise ConfigError(f"expected --key=value, got '{arg}'")
                text = "True"
            if isinstance(defaults[key], str):
                value = text  # --run_name=123 stays a string
            else:
                try:
                    value = ast.literal_eval(text)
                except (SyntaxError, ValueError):
                    value = text
            config[key] = _check_type(key, value, defaults[key], "command line")
    return config


def hyperparameters(namespace):
    """The names in a script's globals that are hyperparameters: plain values, not modules, functions or _private."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}


def check_training(config):
    """ConfigError naming the first of train.py's settings that cannot work (the model's own: GPTConfig)."""
    c = types.SimpleNamespace(**config)
    for name in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                 "eval_iters", "keep_last", "tp_size"):
        if config[name] < 1:
            raise ConfigError(f"{name} must be at least 1, got {config[name]}")
    for bad, message in [
        (c.max_iters < 0, f"max_iters must be >= 0, got {c.max_iters}"),
        (c.warmup_iters < 0, f"warmup_iters must be >= 0, got {c.warmup_iters}"),
        (not c.learning_rate > 0, f"learning_rate must be > 0, got {c.learning_rate}"),
        (c.min_lr < 0, f"min_lr must be >= 0, got {c.min_lr}"),
        (c.weight_decay < 0, f"weight_decay must be >= 0, got {c.weight_decay}"),
        (not (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1), f"beta1 and beta2 must be in [0, 1), got {c.beta1}, {c.beta2}"),
        (c.grad_clip < 0, f"grad_clip must be >= 0 (0 disables clipping), got {c.grad_clip}"),
        (c.lr_schedule not in ("cosine", "wsd"), f"lr_schedule must be 'cosine' or 'wsd', got {c.lr_schedule!r}"),
        (c.decay_lr and c.lr_decay_iters < 1,
         f"lr_decay_iters must be at least 1 (or decay_lr=False), got {c.lr_decay_iters}"),
        (c.lr_schedule == "wsd" and not 0 < c.cooldown_frac <= 1,
         f"cooldown_frac must be in (0, 1], got {c.cooldown_frac}"),
        (c.optimizer not in ("adamw", "muon"), f"optimizer must be 'adamw' or 'muon', got {c.optimizer!r}"),
        (c.mode not in ("pretrain", "sft", "dpo"), f"mode must be 'pretrain', 'sft' or 'dpo', got {c.mode!r}"),
        (c.dpo_beta <= 0, f"dpo_beta must be > 0, got {c.dpo_beta}"),
        (c.moe_bias_rate < 0, f"moe_bias_rate must be >= 0, got {c.moe_bias_rate}"),
        (c.backend not in ("auto", "nccl", "gloo"), f"backend must be 'auto', 'nccl' or 'gloo', got {c.backend!r}"),
        (c.stop_grace <= 0, f"stop_grace must be > 0 seconds, got {c.stop_grace}"),
        (c.save_timeout <= 0, f"save_timeout must be > 0 seconds, got {c.save_timeout}"),
        (c.peak_flops < 0, f"peak_flops must be >= 0 (0 measures it), got {c.peak_flops}"),
        (c.fsdp_cpu_offload and "fsdp" not in c.parallel, "fsdp_cpu_offload=True needs parallel='fsdp' or 'fsdp+tp'"),
        (c.pp_size > 1 and c.mode != "pretrain",
         f"pp_size > 1 trains mode='pretrain' only (not {c.mode!r}): its loss is per token of fixed-length sequences"),
        (os.path.isfile(c.out_dir), f"out_dir={c.out_dir!r} is a file; point out_dir at a directory (new, or a run's)"),
    ]:
        if bad:
            raise ConfigError(message)


# -----------------------------------------------------------------------------
# the 'auto' settings, resolved for this machine: device, dtype, peak FLOP/s


def pick_device(device):
    """'auto' is cuda, then mps, then cpu; anything else must exist here (ValueError naming the setting if not)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here (torch {torch.__version__}, "
                         f"{torch.cuda.device_count()} GPUs visible); use device='cpu' or 'auto'")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} but this machine has {torch.cuda.device_count()} GPUs (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' but MPS (Apple GPU) is not available here; use device='cpu' or 'auto'")
    return device


def pick_dtype(dtype, device_type, n_embd):
    """(name, torch dtype) of the autocast dtype; 'auto': bf16 on GPUs that have it (else fp16), and on the CPU bf16
    from 256 wide (below, the casts cost what the matmuls save: README) and fp32 otherwise."""
    if dtype == "auto" and device_type == "cuda":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    elif dtype == "auto":
        dtype = "bfloat16" if device_type == "cpu" and n_embd >= 256 else "float32"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)} or 'auto', got {dtype!r}")
    if dtype == "float16" and device_type == "cpu":
        raise ValueError("dtype='float16' autocast is not supported on the CPU; use bfloat16 or float32")
    return dtype, dtypes[dtype]


# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common GPUs, matched against torch.cuda.get_device_name().
GPU_PEAK_FLOPS = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("A6000", 155e12), ("L40S", 362e12),
                  ("L4", 121e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12),
                  ("T4", 65e12)]


def hardware_peak_flops(device_type, dtype=torch.float32, override=0.0):
    """The FLOP/s that MFU is a fraction of: `override` when given, the table above on CUDA, and on the CPU the larger
    of its vector units' peak (cpu_vector_peak_flops) and what a large matmul reaches here. No real run beats either
    for long, so the CPU's MFU stays under 100% even when the matmul is timed on a busy machine."""
    if override:
        return override
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), 312e12)
    return max(cpu_vector_peak_flops(dtype), _cpu_matmul_flops(dtype))


def cpu_vector_peak_flops(dtype=torch.float32, cpuinfo=None):
    """torch's threads x clock x FLOPs per cycle per core, read from /proc/cpuinfo (0 where there is none): two FMA
    units as wide as the widest vector extension (AVX-512: 2 x 16 fp32 lanes x 2 FLOPs = 64 a cycle), twice that for
    bf16 with AVX512_BF16, 1024 for bf16 with AMX. Two full-width units is the most any of these cores has, so this
    is an upper bound (AMD's Zen 4 runs AVX-512 at half that rate); the clock is the one the kernel reports.
    `cpuinfo` stands in for the file's text (tests)."""
    info = cpuinfo
    if info is None:
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
        except OSError:
            return 0.0
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((set(line.split(":")[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags and "fma" in flags else 4  # fp32 per vector
    per_cycle = 2 * lanes * 2  # two FMA units, an FMA is two FLOPs
    if dtype == torch.bfloat16:
        per_cycle = 1024 if "amx_bf16" in flags else per_cycle * 2 if "avx512_bf16" in flags else per_cycle
    return torch.get_num_threads() * max(mhz, default=0.0) * 1e6 * per_cycle


@functools.lru_cache
def _cpu_matmul_flops(dtype):
    """The best of half a second of square matmuls (at least five): long enough that a busy moment does not decide."""
    n = 2048 if dtype != torch.float32 else 1024
    a = torch.full((n, n), 0.5, dtype=dtype)  # not randn: that would advance the global RNG
    a @ a  # warm-up
    times, t_end = [], time.perf_counter() + 0.5
    while len(times) < 5 or time.perf_counter() < t_end:
        times.append(timeit.timeit(lambda: a @ a, number=1))
    return 2 * n ** 3 / min(times)
