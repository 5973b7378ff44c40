"""Bad input at every entry point ends in one last line `error: ...` that names the setting, a non-zero exit, and
no file created, changed or removed. The cases run in one helper process that imports torch once and forks a
child per case (each child runs the script as `python script.py ARGS` would), so that ~60 cases cost seconds."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from model import GPT, GPTConfig

# Forks one child per case: each runs the script as __main__ with its argv and cwd, its output in a file, and exits
# as the interpreter would (sys.exit("message") prints the message to stderr, status 1; an uncaught exception goes
# to sys.excepthook, status 1).
HARNESS = r"""
import json, os, runpy, sys, traceback
sys.path.insert(0, ROOT)
import numpy, tiktoken, torch, data, configurator, model, parallel  # what every entry point imports, once
results = []
for script, args, cwd, log in json.load(sys.stdin):
    def tree():
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                for d, _, files in os.walk(cwd) for f in files if "__pycache__" not in d}
    before = tree()
    pid = os.fork()
    if pid == 0:
        os.chdir(cwd)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        sys.argv, code = [script, *args], 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            sys.stdout.flush()
            code = e.code if isinstance(e.code, int) or e.code is None else print(e.code, file=sys.stderr) or 1
        except BaseException:
            sys.excepthook(*sys.exc_info())  # as the interpreter does with an uncaught exception
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    after = tree()
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    results.append({"code": os.waitstatus_to_exitcode(status), "changed": changed})
print(json.dumps(results))
""".replace("ROOT", repr(ROOT))

TRAIN = ["--dataset=tiny", "--device=cpu", "--dtype=float32", "--n_layer=1", "--n_head=2", "--n_embd=16",
         "--block_size=8", "--batch_size=2", "--eval_iters=1", "--max_iters=2"]
REVISE = ["revise", "--prompts=prompts.jsonl", "--constitution=c.json", "--out=out.jsonl", "--device=cpu"]

# (script, arguments, what the last line must name); paths are relative to the work directory built below
CASES = [
    ("train.py", ["--batch_size=-1"], "batch_size"),
    ("train.py", ["--block_size=0"], "block_size"),
    ("train.py", ["--gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
    ("train.py", ["--eval_iters=0"], "eval_iters"),
    ("train.py", ["--log_interval=0"], "log_interval"),
    ("train.py", ["--max_iters=-1"], "max_iters"),
    ("train.py", ["--warmup_iters=200", "--lr_decay_iters=100"], "warmup_iters=200 exceeds lr_decay_iters=100"),
    ("train.py", ["--dropout=1.5"], "dropout"),
    ("train.py", ["--learning_rate=-0.001"], "learning_rate"),
    ("train.py", ["--beta2=1.5"], "beta2"),
    ("train.py", ["--grad_clip=-1"], "grad_clip"),
    ("train.py", ["--lr_schedule=linear"], "lr_schedule"),
    ("train.py", ["--optimizer=sgd"], "optimizer"),
    ("train.py", ["--keep_last=0"], "keep_last"),
    ("train.py", ["--stop_grace=0"], "stop_grace"),
    ("train.py", ["--n_layer=0"], "n_layer"),
    ("train.py", ["--n_embd=30", "--n_head=4"], "n_embd=30"),
    ("train.py", ["--n_expert=4", "--top_k=5"], "top_k"),
    ("train.py", ["--device=tpu9"], "device"),
    ("train.py", ["--device=cuda"], "device='cuda'"),
    ("train.py", ["--dtype=float16"], "float16"),
    ("train.py", ["--dtype=float64"], "dtype"),
    ("train.py", ["--parallel=ddp"], "parallel"),
    ("train.py", ["--fsdp_cpu_offload=True"], "fsdp_cpu_offload"),
    ("train.py", ["--out_dir=afile"], "out_dir"),
    ("train.py", ["--init_from=no_such_run"], "init_from"),
    ("train.py", ["--learnig_rate=0.1"], "did you mean 'learning_rate'"),
    ("train.py", ["--batch_size=abc"], "batch_size"),
    ("train.py", ["--learnin_rate=0.1"], "learning_rate"),
    ("train.py", ["syntax_error.py"], "syntax_error.py, line 2"),
    ("train.py", ["raises.py"], "raises.py, line 3"),
    ("train.py", ["no_such_config.py"], "no_such_config.py"),
    ("train.py", ["--dataset=badmeta"], "meta.json"),
    ("train.py", ["--dataset=odd"], "train.bin"),
    ("train.py", ["--dataset=nothing"], "train.bin"),
    ("train.py", ["--mode=sft"], "train_jsonl"),
    ("train.py", ["--block_size=4096"], "block_size"),
    ("train.py", ["--init_from=resume", "--out_dir=garbage"], "not a nanothink checkpoint"),
    ("train.py", ["--init_from=resume", "--out_dir=truncated"], "truncated"),
    ("train.py", ["--init_from=resume", "--out_dir=newer"], "incompatible version"),
    ("train.py", ["--init_from=resume", "--out_dir=other"], "not a nanothink checkpoint"),
    ("train.py", ["--init_from=resume", "--out_dir=exported"], "weights only"),
    ("train.py", ["--init_from=resume", "--out_dir=empty_run"], "init_from"),
    ("train.py", ["--init_from=truncated", "--out_dir=new"], "truncated"),
    ("train.py", ["--init_from=resume", "--out_dir=run", "--block_size=16"], "block_size=16"),
    ("sample.py", ["--max_new_tokens=-5"], "max_new_tokens"),
    ("sample.py", ["--top_p=2"], "top_p"),
    ("sample.py", ["--temperature=-1"], "temperature"),
    ("sample.py", ["--num_samples=0"], "num_samples"),
    ("sample.py", ["--top_k=-1"], "top_k"),
    ("sample.py", ["--device=tpu9"], "device"),
    ("sample.py", ["--start=FILE:no_such_prompt.txt"], "start"),
    ("sample.py", ["--init_from=llama"], "init_from"),
    ("sample.py", ["--out_dir=garbage"], "not a nanothink checkpoint"),
    ("sample.py", ["--out_dir=truncated"], "truncated"),
    ("sample.py", ["--out_dir=newer"], "incompatible version"),
    ("sample.py", ["--out_dir=mismatched"], "does not fit"),
    ("bench.py", ["--batch_size=0"], "batch_size"),
    ("bench.py", ["--rounds=0"], "rounds"),
    ("bench.py", ["--dtype=float8"], "dtype"),
    ("bench.py", ["--optimizer=adamw,sgd"], "optimizer"),
    ("bench.py", ["--n_head=0"], "n_head"),
    ("bench.py", ["moe", "--top_k=9"], "top_k"),
    ("bench.py", ["--device=tpu9"], "device"),
    ("bench.py", ["depth", "--dre_thresholds=a,b"], "dre_thresholds"),
    ("bench.py", ["depth", "--out_dir=truncated"], "truncated"),
    ("bench.py", ["syntax_error.py"], "syntax_error.py, line 2"),
    ("bench.py", ["--dre"], "python bench.py depth"),  # the old switches name their subcommand
    ("bench.py", ["--memory", "--estimate"], "--dry_run=N"),  # estimate is replaced by train.py's dry run
    ("bench.py", ["estimate", "config/medium_moe.py"], "--dry_run=N"),
    ("data/text/prepare.py", ["no_such_file.txt"], "no_such_file.txt"),
    ("data/text/prepare.py", ["--val_fraction=1.5", "text.txt"], "val_fraction"),
    ("data/text/prepare.py", ["--out_dir=afile", "text.txt"], "out_dir"),
    ("data/shakespeare_char/prepare.py", ["--input=no_such_file.txt"], "no_such_file.txt"),
    ("data/shakespeare_char/prepare.py", ["--input=data"], "--input"),
    ("data/shakespeare_char/prepare.py", ["--input=tiny.txt"], "--input"),
    ("data/shakespeare_char/prepare.py", ["--input=latin1.txt"], "UTF-8"),
    ("constitution.py", ["validate", "no_such.json"], "no_such.json"),
    ("constitution.py", ["validate", "syntax_error.py"], "invalid JSON"),
    ("constitution.py", [*REVISE, "--out_dir=run", "--max_new_tokens=0"], "--max_new_tokens"),
    ("constitution.py", [*REVISE, "--out_dir=run", "--temperature=-1"], "--temperature"),
    ("constitution.py", [*REVISE, "--out_dir=garbage"], "not a nanothink checkpoint"),
    ("constitution.py", [*REVISE, "--out_dir=run", "--device=tpu9"], "device"),
    ("convert.py", ["empty_run", "--ckpt"], "distributed checkpoint"),
    ("convert.py", ["no_such_run", "hf"], "no_such_run"),
    ("convert.py", ["garbage", "hf"], "not a nanothink checkpoint"),
    ("convert.py", ["run", "afile"], "--force"),
    ("convert.py", ["run"], "HF_DIR"),
]


def make_checkpoint(path, **changes):
    """A ckpt.pt as train.py writes it, for a 1-layer model of the 'tiny' dataset."""
    args = dict(vars(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=8)))
    ckpt = {"version": 1, "model_args": args, "model": GPT(GPTConfig(**args)).state_dict(), "iter_num": 2,
            "best_val_loss": 2.0, "config": {"dataset": "tiny"}, "optimizers": [], "rng": [], "scaler": {}}
    ckpt.update(changes)
    os.makedirs(path)
    torch.save(ckpt, os.path.join(path, "ckpt.pt"))
    return os.path.join(path, "ckpt.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("errors")

    def w(name, data):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data) if isinstance(data, bytes) else (work / name).write_text(data)

    meta = {"vocab_size": 8, "dtype": "uint16", "tokenizer": "char", "chars": "abcdefgh", "eot_id": None}
    tokens = bytes(range(8)) * 250  # 1000 uint16 tokens, ids below 8
    for name in ("tiny", "odd", "badmeta"):
        w(f"data/{name}/meta.json", json.dumps(meta))
        w(f"data/{name}/train.bin", tokens + (b"\x00" if name == "odd" else b""))
        w(f"data/{name}/val.bin", tokens)
    w("data/badmeta/meta.json", '{"vocab_size": 8, "dtype": ')
    w("afile", "not a directory")
    w("syntax_error.py", "batch_size = 4\nn_layer = (\n")
    w("raises.py", "batch_size = 4\n\nn_layer = undefined_name\n")
    w("text.txt", "some text to tokenize\n")
    w("tiny.txt", "too short")
    w("latin1.txt", "caf\u00e9 ".encode("latin-1") * 100)
    w("prompts.jsonl", '{"prompt": "hi"}\n')
    shutil.copy(os.path.join(ROOT, "data", "constitutions", "helpful_harmless.json"), work / "c.json")
    for script in ("text", "shakespeare_char"):  # copies, so no case can write into the repository's data/
        (work / "data" / script).mkdir()
        shutil.copy(os.path.join(ROOT, "data", script, "prepare.py"), work / "data" / script)
    good = make_checkpoint(work / "run")
    w("garbage/ckpt.pt", b"this is not a checkpoint\n" * 40)
    w("truncated/ckpt.pt", open(good, "rb").read()[:3000])
    make_checkpoint(work / "newer", version=2)
    make_checkpoint(work / "mismatched", model={})
    os.makedirs(work / "exported")
    torch.save({"version": 1, "model_args": vars(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)),
                "model": {}, "config": {}, "iter_num": 2}, work / "exported" / "ckpt.pt")
    os.makedirs(work / "other")
    torch.save({"weights": torch.zeros(3)}, work / "other" / "ckpt.pt")
    os.makedirs(work / "empty_run")
    cases = [(os.path.join(work if script.startswith("data/") else ROOT, script),
              TRAIN + args if script == "train.py" else args, str(work),
              str(tmp_path_factory.mktemp("log") / "out.txt")) for script, args, _ in CASES]
    proc = subprocess.run([sys.executable, "-c", HARNESS], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    for r, (_, _, _, log) in zip(out, cases):
        r["output"] = open(log).read()
    return out


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{s}:{' '.join(a)[-50:]}" for s, a, _ in CASES])
def test_bad_input_ends_in_one_error_line_naming_it_and_touches_nothing(results, i):
    script, args, named = CASES[i]
    r = results[i]
    lines = r["output"].strip().splitlines()
    assert r["code"] != 0, r["output"][-2000:]
    assert lines and lines[-1].startswith("error: "), r["output"][-2000:]
    assert named in lines[-1], lines[-1]
    assert "Traceback" not in r["output"], r["output"][-2000:]
    assert r["changed"] == [], r["changed"]


def test_a_bad_input_in_a_real_process_ends_the_same_way(tmp_path):
    # one case as a user would run it, in case the harness differed from `python train.py`
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--eval_iters=0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: eval_iters must be at least 1, got 0"
    assert os.listdir(tmp_path) == []
