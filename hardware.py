"""
What 'auto' means on this machine, decided here for every script: the device (cuda, then mps, then cpu), the
autocast dtype, and the peak FLOP/s that MFU is a fraction of (a table of GPUs; on the CPU its vector units or a
timed matmul, whichever is higher).
"""

import functools
import time
import timeit
from contextlib import nullcontext

import torch



DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def pick_dtype(dtype, device_type, n_embd=0):
    """(name, torch dtype) of the autocast dtype; 'auto': bf16 on GPUs that have it (else fp16), and on the CPU bf16
    for training from 256 wide (below, the casts cost what the matmuls save: docs/results.md) and fp32 otherwise
    (inference passes no width)."""
    if dtype == "auto" and device_type == "cuda":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    elif dtype == "auto":
        dtype = "bfloat16" if device_type == "cpu" and n_embd >= 256 else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or 'auto', got {dtype!r}")
    if dtype == "float16" and device_type == "cpu":
        raise ValueError("dtype='float16' autocast is not supported on the CPU; use bfloat16 or float32")
    return dtype, DTYPES[dtype]


def autocast(device_type, dtype):
    """The context a forward runs in: none for float32, else torch.autocast to that dtype."""
    return nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


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
