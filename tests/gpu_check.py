"""
The GPU check: one command for the day a GPU is lent, under 10 minutes on one H100. It runs the `gpu`-marked tests;
measures training speed (forward, backward and AdamW step: tokens/s and MFU, by bench.py) of GPT-2 124M
(config/train_gpt2.py's shape) with compile off and on, and of config/medium_moe.py cut to 4 layers under each
moe_kernel; then trains that MoE model 50 steps (train.py, on Tiny Shakespeare in GPT-2 BPE) and checks that its loss
falls. It prints a table, writes a JSON file and exits non-zero if any part failed.

    python tests/gpu_check.py                    # on a GPU: gpu_check.json
    python tests/gpu_check.py --device=cpu       # the same parts at a tiny size on the CPU, so that it cannot rot

Each part runs as a user runs it (pytest, bench.py, train.py) in a process of its own: its own peak memory, and a
part that fails does not stop the others. It lives in tests/ because it is a test runner; bench.py measures one shape.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the CPU form: every model 2 layers of 64, a step or two timed, compile off, a nominal peak (not measured: seconds)
TINY = ["--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=64", "--batch_size=2", "--peak_flops=1e12"]
TINY_MOE = [*TINY, "--n_expert=4", "--expert_hidden=64"]


def run(cmd, device, cwd=ROOT, timeout=600):
    """cmd's exit code, its output's last lines and its seconds; a timeout counts as a failure. On the CPU one thread
    a process, unless OMP_NUM_THREADS says otherwise: tiny models gain nothing from more, a busy machine loses much."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")) if device == "cpu" else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = -1, f"timed out after {timeout} s: {(e.stdout or b'')[-2000:]!r}"
    return code, "\n".join(out.strip().splitlines()[-15:]), time.perf_counter() - t0


def gpu_tests(device):
    code, tail, secs = run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                            device)
    summary = tail.splitlines()[-1] if tail else ""
    # on the CPU each one skips (needs CUDA); on a GPU some must run (a few skip by design: grouped_mm takes no fp16)
    ok = code == 0 and (device == "cpu" or " passed" in summary)
    return [dict(part="gpu tests", what="pytest -m gpu", ok=ok, result=summary, s=secs,
                 **({} if ok else {"output": tail}))]


def speed(part, args, device, tmp):
    """bench.py's throughput of one shape, one row per variant it measures."""
    out = os.path.join(tmp, f"{part.split()[0]}.json")
    code, tail, secs = run([sys.executable, "bench.py", *args, f"--device={device}", f"--json_out={out}"],
                            device)
    if code or not os.path.exists(out):
        return [dict(part=part, what=" ".join(args), ok=False, result="bench.py failed", s=secs, output=tail)]
    with open(out) as f:
        res = json.load(f)
    return [dict(part=part, what=row["variant"], ok=True, s=secs if i == 0 else 0, tokens_per_s=row["tokens_per_s"],
                 mfu=row["mfu"], ms_per_iter=row["ms_per_iter"], params=res["params"], peak_mib=res["peak_mib"],
                 result=f"{row['tokens_per_s']:>10,.0f} tokens/s  MFU {row['mfu']:6.1%}  {row['ms_per_iter']:7.1f} ms"
                        f"/iter  peak {res['peak_mib']:,.0f} MiB")
            for i, row in enumerate(res["rows"])]


def train(args, device, tmp):
    """50 steps of train.py on Tiny Shakespeare (GPT-2 BPE, prepared into tmp): the loss must fall."""
    data_dir = os.path.join(tmp, "data", "shakespeare")
    code, tail, secs = run([sys.executable, os.path.join(ROOT, "data", "shakespeare_char", "prepare.py"),
                            "--tokenizer=gpt2", f"--out_dir={data_dir}"], device)
    if not code:
        out_dir = os.path.join(tmp, "out")
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "medium_moe.py"), *args,
               "--dataset=shakespeare",
               f"--out_dir={out_dir}", "--max_iters=50", "--lr_decay_iters=50", "--warmup_iters=5",
               "--gradient_accumulation_steps=1", "--eval_interval=50", "--eval_iters=2", "--log_interval=1",
               f"--device={device}"]
        code, tail, secs = run(cmd, device, cwd=tmp)  # where data/shakespeare is
    losses = []
    if not code:
        with open(os.path.join(tmp, "out", "metrics.jsonl")) as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    first, last = (sum(losses[:5]) / 5, sum(losses[-5:]) / 5) if len(losses) >= 10 else (0.0, 0.0)
    ok = code == 0 and len(losses) == 50 and last < 0.9 * first
    result = f"loss {first:.3f} -> {last:.3f} (mean of the first and last 5 of {len(losses)} steps)"
    return [dict(part="train 50 steps", what=f"medium_moe {'tiny' if device == 'cpu' else '4 layers'}", ok=ok, s=secs,
                 args=args,
                 result=result if losses else "train.py failed", losses=losses, **({} if ok else {"output": tail}))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu (the same parts, tiny)")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file written (default: %(default)s)")
    opts = parser.parse_args(argv)
    gpu = opts.device != "cpu"
    if gpu and not __import__("torch").cuda.is_available():
        sys.exit("error: --device=cuda but torch sees no CUDA GPU; on a machine without one run --device=cpu")
    timing = ["--warmup=3", "--rounds=3", "--steps=10"] if gpu else ["--warmup=1", "--rounds=1", "--steps=1"]
    dense = ["config/train_gpt2.py", *timing, "--vocab_size=50304"]  # not data/openwebtext's, if it is there
    dense += ["--dtype=bfloat16", "--compile=False,True"] if gpu else [*TINY, "--dtype=float32", "--compile=False"]
    moe = ["config/medium_moe.py", "--n_layer=4", *timing, "--dtype=bfloat16", "--compile=False", "--vocab_size=50304"]
    moe += ["--moe_kernel=grouped_mm,triton,loop"] if gpu else [*TINY_MOE, "--moe_kernel=grouped_mm,loop"]
    # the 50 steps: the config's settings (bf16, compile) on a GPU; on the CPU tiny, at a learning rate it notices
    train_args = ["--n_layer=4"] if gpu else [*TINY_MOE, "--compile=False", "--dtype=float32", "--learning_rate=3e-3"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in [("gpu tests", lambda: gpu_tests(opts.device)),
                           ("dense 124M", lambda: speed("dense 124M", dense, opts.device, tmp)),
                           ("moe 4 layers", lambda: speed("moe 4 layers", moe, opts.device, tmp)),
                           ("train", lambda: train(train_args, opts.device, tmp))]:
            print(f"  {name}...", file=sys.stderr, flush=True)
            rows += part()
    device = __import__("torch").cuda.get_device_name() if gpu else "cpu (the dry form: tiny models)"
    print(f"GPU check on {device}")
    print(f"{'part':<16} {'what':<28} {'ok':<4} {'s':>5}  result")
    for r in rows:
        secs = f"{r['s']:>5.0f}" if r["s"] else ""
        print(f"{r['part']:<16} {r['what']:<28} {'ok' if r['ok'] else 'FAIL':<4} {secs:>5}  {r['result']}")
        if not r["ok"] and r.get("output"):
            print("    " + r["output"].replace("\n", "\n    "))
    with open(opts.out, "w") as f:
        json.dump(dict(device=device, ok=all(r["ok"] for r in rows), rows=rows), f, indent=1)
    print(f"written: {opts.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
