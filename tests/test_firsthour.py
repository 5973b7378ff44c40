"""What a newcomer meets in the first hour: the data ships and prepares without a network, one run per out_dir
unless told otherwise, resuming says what it resumed, the end of a run sums it up, finished distributed runs exit 0
every time, MFU stays under 100%, bench.py reports progress and a char-level corpus of your own trains."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import hardware
import convert
from conftest import ROOT, SHAKESPEARE, run_script, run_train
from model import GPT, GPTConfig

TINY = ["--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--n_layer=1", "--n_head=2",
        "--n_embd=16", "--block_size=16", "--batch_size=2", "--eval_iters=1", "--log_interval=1",
        "--warmup_iters=1", "--lr_decay_iters=10"]
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")
NO_NETWORK = {**{k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"},
              "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",  # nothing listens there
              "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}


def run(args, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# the data ships


def test_shakespeare_prepares_from_the_shipped_files_without_network(tmp_path):
    # the repository's data/ layout, without anything prepared, and tiktoken with no cache and no network
    for name in ("shakespeare", "shakespeare_char"):
        (tmp_path / "data" / name).mkdir(parents=True)
        shutil.copy(os.path.join(ROOT, "data", name, "prepare.py"), tmp_path / "data" / name)
    shutil.copy(SHAKESPEARE, tmp_path / "data")
    shutil.copytree(os.path.join(ROOT, "data", "tiktoken"), tmp_path / "data" / "tiktoken")
    for name in ("shakespeare", "shakespeare_char"):
        proc = run([tmp_path / "data" / name / "prepare.py"], env=NO_NETWORK)
        assert proc.returncode == 0, proc.stderr[-2000:]
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    assert len(text) == 1115394 and text.startswith("First Citizen:\nBefore we proceed any further")
    char = np.fromfile(tmp_path / "data" / "shakespeare_char" / "train.bin", dtype=np.uint16)
    assert len(char) == int(0.9 * len(text))
    bpe = np.fromfile(tmp_path / "data" / "shakespeare" / "train.bin", dtype=np.uint16)
    # GPT-2's ids for "First Citizen:\nBefore" (First, " Citizen", ":", "\n", Before)
    assert bpe[:5].tolist() == [5962, 22307, 25, 198, 8421]
    assert sorted(os.listdir(tmp_path / "data" / "tiktoken")) == sorted(os.listdir(os.path.join(ROOT, "data",
                                                                                                 "tiktoken")))


def test_own_text_at_the_character_level_trains_and_samples(tmp_path):
    (tmp_path / "poems").mkdir()
    docs = {"a.txt": "Roses are red,\nviolets are blue.\n" * 20, "b.txt": "Sugar is sweet; so are you!\n" * 20}
    for name, text in docs.items():
        (tmp_path / "poems" / name).write_text(text)
    out = tmp_path / "data" / "poems"
    proc = run([os.path.join(ROOT, "data", "text", "prepare.py"), tmp_path / "poems", "--tokenizer=char",
                "--val_fraction=0.3", "--out_dir", out])
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    whole = docs["a.txt"] + docs["b.txt"]  # sorted order, no separator between documents
    assert meta["chars"] == "".join(sorted(set(whole))) and meta["vocab_size"] == len(meta["chars"])
    ids = np.concatenate([np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert "".join(meta["chars"][i] for i in ids) == whole
    assert len(np.fromfile(out / "val.bin", dtype=np.uint16)) == len(docs["b.txt"])  # split at the boundary
    args = [*TINY, "--dataset=poems", f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--eval_interval=2"]
    run_train(args, tmp_path, env=ONE_THREAD)
    proc = run_script("sample.py", [f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--num_samples=1",
                                    "--max_new_tokens=20", "--start=Roses"], tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Roses") and f"sampling {tmp_path / 'out' / 'ckpt.pt'}" in proc.stderr
    # a block longer than val.bin: the error names the setting that fixes it
    proc = run_train([*args, "--block_size=600", f"--out_dir={tmp_path / 'out2'}"], tmp_path, check=False)
    assert proc.returncode != 0 and "--val_fraction" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


# -----------------------------------------------------------------------------
# runs and their checkpoints


def test_an_out_dir_holds_one_run_unless_resumed_or_overwritten(char_data, tmp_path):
    first = run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=3", "--eval_interval=3"], char_data,
                      env=ONE_THREAD)
    ckpt = tmp_path / "ckpt.pt"
    best = torch.load(ckpt, weights_only=True)["best_val_loss"]
    summary = first.stdout.strip().splitlines()[-1]  # the last line sums the run up
    assert summary.startswith("done: 3 iterations in ") and f"best val loss {best:.4f}" in summary
    assert "tokens/s" in summary and f"checkpoint {ckpt}" in summary
    assert f"python sample.py --out_dir={tmp_path}" in summary
    stamp = os.path.getmtime(ckpt)

    refused = run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=3"], char_data, check=False, env=ONE_THREAD)
    message = refused.stdout.strip().splitlines()[-1]
    assert refused.returncode != 0 and message.startswith("error: ") and str(ckpt) in message
    assert "--init_from=resume" in message and "--overwrite=True" in message
    assert os.path.getmtime(ckpt) == stamp

    resumed = run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=5", "--eval_interval=5", "--init_from=resume"],
                        char_data, env=ONE_THREAD)
    assert f"resuming {ckpt} from iter 3 (best val loss {best:.4f})" in resumed.stdout
    run_train([*TINY, f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2", "--overwrite=True"], char_data,
              env=ONE_THREAD)
    assert torch.load(ckpt, weights_only=True)["iter_num"] == 2
    starts = [r for r in records(tmp_path) if "run_start" in r]
    assert [(r["iter"], r["init_from"]) for r in starts] == [(0, "scratch"), (3, "resume"), (0, "scratch")]
    for r in records(tmp_path):
        assert "mfu" not in r or 0 < r["mfu"] < 1


def save_tiny(path):
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)
    torch.save({"model": GPT(cfg).state_dict(), "model_args": vars(cfg), "config": {}, "iter_num": 1,
                "best_val_loss": 1.0}, path)


def test_the_later_checkpoint_by_iteration_is_the_runs_whatever_the_file_times(tmp_path):
    """B6: which of ckpt.pt and ckpt_dcp/ a run continues from (and sample.py reads) is decided by iteration, the
    distributed one winning a tie (the ckpt.pt convert.py --ckpt writes from it): file times, which a conversion or a
    copy sets, do not flip it."""
    from checkpoint import newest
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)
    (tmp_path / "ckpt_dcp").mkdir()
    for file_iter, dcp_iter, want in ((5, 5, "dcp"), (5, 7, "dcp"), (7, 5, "file")):
        torch.save({"model": GPT(cfg).state_dict(), "model_args": vars(cfg), "config": {}, "iter_num": file_iter,
                    "best_val_loss": 1.0}, tmp_path / "ckpt.pt")
        torch.save({"model_args": vars(cfg), "config": {}, "iter_num": dcp_iter}, tmp_path / "ckpt_dcp" / "meta.pt")
        for stamp in (1e9, 2e9):  # the file older, then newer, than the distributed checkpoint
            os.utime(tmp_path / "ckpt.pt", (stamp, stamp))
            assert newest(tmp_path)[0] == want, (file_iter, dcp_iter, stamp)


@pytest.mark.slow
def test_the_sample_command_a_torchrun_run_prints_works_as_printed(char_data, tmp_path):
    """B6: after a sharded run (fsdp, a distributed checkpoint), the command its last line prints samples it, and
    so does the conversion to one file first; both from the run's own tokenizer, wherever they are run from."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), "--dataset=shakespeare_char", "--device=cpu",
                           "--dtype=float32", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
                           "--batch_size=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                           "--parallel=fsdp", f"--out_dir={out}"], cwd=char_data, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    printed = proc.stdout.split("sample it: ")[1].splitlines()[0]
    assert printed == f"python sample.py --out_dir={out}", printed
    for cmd in (printed, f"python convert.py {out} --ckpt && {printed}"):  # the second: what it printed before
        cmd = cmd.replace("python convert.py", f"{sys.executable} {ROOT}/convert.py").replace(
            "python sample.py", f"{sys.executable} {ROOT}/sample.py --max_new_tokens=20 --num_samples=1")
        ran = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0 and "tokens/s" in ran.stdout, (cmd, ran.stdout[-1000:], ran.stderr[-2000:])


def test_export_refuses_to_replace_a_newer_ckpt(tmp_path):
    (tmp_path / "ckpt_dcp").mkdir()
    torch.save({"iter_num": 0}, tmp_path / "ckpt_dcp" / "meta.pt")
    save_tiny(tmp_path / "ckpt.pt")  # a later single-file run's (iter 1)
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(FileExistsError, match="newer"):
        convert.dcp_to_ckpt(str(tmp_path))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


# -----------------------------------------------------------------------------
# a finished distributed run exits 0, every time


@pytest.mark.slow
def test_finished_torchrun_job_exits_0_five_times_in_a_row(char_data, tmp_path):
    # the five jobs run at once: a busy machine is when exit-time races show
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *TINY, "--max_iters=2", "--eval_interval=2"]
    procs = [subprocess.Popen([*cmd, f"--out_dir={tmp_path / str(i)}"], cwd=char_data, env=ONE_THREAD,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(5)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        assert "terminate called" not in out and "done: 2 iterations" in out


# -----------------------------------------------------------------------------
# numbers


def test_cpu_peak_is_threads_times_clock_times_vector_flops():
    info = "processor\t: 0\ncpu MHz\t\t: 2000.000\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n"
    threads = torch.get_num_threads()
    # AVX-512: 16 fp32 lanes, an FMA is 2 FLOPs, two FMA units; AVX512_BF16 doubles it
    assert hardware.cpu_vector_peak_flops(torch.float32, info) == threads * 2e9 * 16 * 2 * 2
    assert hardware.cpu_vector_peak_flops(torch.bfloat16, info) == threads * 2e9 * 16 * 2 * 2 * 2
    avx2 = info.replace(" avx512f avx512_bf16", "")
    assert hardware.cpu_vector_peak_flops(torch.bfloat16, avx2) == threads * 2e9 * 8 * 2 * 2
    assert hardware.cpu_vector_peak_flops(torch.float32, "no such lines") == 0.0


def test_bench_reports_progress_and_no_nan(tmp_path):
    proc = run_script("bench.py", ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8",
                                   "--batch_size=2", "--vocab_size=65", "--dtype=float32", "--warmup=1", "--rounds=2",
                                   "--steps=1"], tmp_path, check=False, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warm-up" in proc.stderr and "round 1/2" in proc.stderr and "round 2/2" in proc.stderr
    assert "nan" not in proc.stdout.lower() and "float32" in proc.stdout


def test_gpt2_offline_is_one_line_at_once(tmp_path):
    """N4: GPT-2's weights neither cached nor reachable end sample.py in one line saying what to do offline, at once
    (the Hub's address is pointed at a closed port here, so that no test ever downloads)."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://127.0.0.1:9", HF_HUB_OFFLINE="0")
    proc = run_script("sample.py", ["--init_from=gpt2", "--device=cpu"], tmp_path, check=False, env=env, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: init_from='gpt2'"), proc.stderr
    assert "not in the Hugging Face cache" in lines[0] and "init_from=hf:FOLDER" in lines[0]


def test_sample_compile_compiles_what_generation_runs(tmp_path):
    """B4: --compile=True compiles what raw_model.generate calls for every token, not a model nothing calls.
    torch.compile is replaced by a stand-in that counts the calls of what it was given (no compilation here)."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=65)
    torch.save({"model": GPT(cfg).state_dict(), "model_args": vars(cfg), "config": {"dataset": "none"},
                "iter_num": 1, "best_val_loss": 1.0,
                "tokenizer": {"tokenizer": "char", "chars": "".join(map(chr, range(32, 97)))}}, tmp_path / "ckpt.pt")
    script = (f"import runpy, sys, torch\nsys.path.insert(0, {ROOT!r})\ncalls = []\n"
              "def stand_in(fn, **kw):\n"
              "    def counted(*a, **k):\n        calls.append(fn.__name__)\n        return fn(*a, **k)\n"
              "    return counted\n"
              "torch.compile = stand_in\n"
              f"sys.argv = ['sample.py', '--out_dir={tmp_path}', '--compile=True', '--num_samples=1',\n"
              "            '--max_new_tokens=5', '--device=cpu', '--start=AB']\n"
              f"runpy.run_path({os.path.join(ROOT, 'sample.py')!r}, run_name='__main__')\n"
              "print('calls', calls)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "calls " + str(["hidden"] * 5), proc.stdout
