"""
How strong the fast tests are, measured: each mutant below is a real bug a developer could make, seeded one at a
time into a fresh temporary copy of the repository (never into this working tree), and the fast suite (the README's
`python -m pytest tests`, pytest.ini's `-m "not slow"`) must fail for each. A mutant that lives is a missing test.

    python tests/mutants.py                          every mutant against the fast suite: the mutated module's own
                                                     test files, then (if it survives them) the rest
    python tests/mutants.py --all                    every test on every mutant: which files catch what (hours)
    python tests/mutants.py --only rotary-sign --files tests/test_model.py tests/test_convert.py
    python tests/mutants.py --list                   only check that every mutant still applies

Each mutant's old text must occur exactly once in its file: after a refactor one that no longer applies is
reported as an error, not passed. The copy holds `git ls-files` (git add a new test file first). Exit status: 0
when every mutant is killed, 1 when one lives, 2 when one does not apply.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, file, exact old text, new text): each one bug, as small as the mistake would be
MUTANTS = [
    # model.py
    ("rotary-sign", "model.py", "torch.cat([-sin, sin], -1)", "torch.cat([sin, -sin], -1)"),
    ("attention-not-causal", "model.py", "is_causal=(start == 0 and T > 1)", "is_causal=False"),
    ("kv-cache-mask-off-by-one", "model.py", ".tril(diagonal=start)", ".tril(diagonal=start - 1)"),
    ("rmsnorm-eps-outside-rsqrt", "model.py", "torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)",
     "(torch.rsqrt(xf.pow(2).mean(-1, keepdim=True)) + self.eps)"),
    ("gqa-heads-tiled-not-repeated", "model.py",
     "        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask",
     "        k, v = (t.repeat(1, q.size(1) // t.size(1), 1, 1) for t in (k, v))  # 0,1,0,1 not 0,0,1,1\n"
     "        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask"),
    ("swiglu-gate-on-up", "model.py", "F.silu(self.c_gate(x)) * self.c_fc(x)", "F.silu(self.c_fc(x)) * self.c_gate(x)"),
    ("top-p-drops-the-crossing-token", "model.py", "drop = probs.cumsum(dim=-1) - probs > top_p",
     "drop = probs.cumsum(dim=-1) > top_p"),
    ("temperature-multiplies", "model.py", "logits = logits / temperature", "logits = logits * temperature"),
    ("top-k-drops-the-kth", "model.py", "logits.masked_fill(logits < kth,", "logits.masked_fill(logits <= kth,"),
    ("muon-lr-scale-min-side", "muon.py", "scale = 0.2 * math.sqrt(max(p.shape))",
     "scale = 0.2 * math.sqrt(min(p.shape))"),
    ("muon-no-weight-decay", "muon.py", "torch._foreach_mul_(params, 1 - lr * group[\"weight_decay\"])",
     "torch._foreach_mul_(params, 1.0)"),
    # moe.py
    ("top1-weight-renormalised", "moe.py", "if self.renormalize and self.top_k > 1 else score",
     "if self.renormalize else score"),
    ("capacity-keeps-lowest", "moe.py", "score.flatten().argsort(descending=True, stable=True)",
     "score.flatten().argsort(descending=False, stable=True)"),
    ("aux-loss-f-times-f", "moe.py", "(f * P).sum()", "(f * f).sum()"),
    ("aux-loss-f-per-token", "moe.py", "f = self.count(expert).float() / expert.numel()",
     "f = self.count(expert).float() / expert.size(0)"),
    ("z-loss-of-logits-not-logsumexp", "moe.py", "torch.logsumexp(logits, -1).pow(2).mean()",
     "logits.pow(2).mean()"),
    ("bias-balancing-sign", "moe.py", "torch.sign(load.mean() - load)", "torch.sign(load - load.mean())"),
    ("expert-gate-on-up", "moe.py", "F.silu(gate) * up", "F.silu(up) * gate"),
    # train.py
    ("warmup-off-by-one", "train.py", "learning_rate * (it + 1) / (warmup_iters + 1)",
     "learning_rate * it / warmup_iters"),
    ("cosine-stuck-at-peak", "train.py", "ratio = (it - warmup_iters) / max(", "ratio = (it - warmup_iters) // max("),
    ("grad-accumulation-not-divided", "train.py",
     "            loss = loss / gradient_accumulation_steps\n", ""),
    ("grad-clip-skipped", "train.py", "        model.clip_grad_norm_(grad_clip)\n", ""),
    ("data-state-after-prefetch", "train.py",
     "        data_state, batch = data_gen.get_state(), get_batch(\"train\", data_gen)",
     "        batch = get_batch(\"train\", data_gen)\n        data_state = data_gen.get_state()"),
    ("bits-per-byte-in-nats", "train.py", "out[\"val\"] / math.log(2) / val_bytes_per_token",
     "out[\"val\"] / val_bytes_per_token"),
    # checkpoint.py
    ("data-rng-not-restored", "checkpoint.py", "    data_gen.set_state(rng[\"data\"])\n", ""),
    ("dropout-rng-not-restored", "checkpoint.py", "    torch.set_rng_state(rng[\"torch\"])\n", ""),
    ("optimizer-state-not-restored", "checkpoint.py", "            opt.load_state_dict(state)\n",
     "            pass\n"),
    ("checkpoint-not-atomic", "checkpoint.py",
     "    torch.save(state, path + \".tmp\")\n"
     "    with open(path + \".tmp\", \"rb\") as f:\n"
     "        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint\n"
     "    if keep_last > 1 and os.path.exists(path):\n"
     "        previous = os.path.join(out_dir, f\"ckpt-{read_checkpoint(path)['iter_num']}.pt\")\n"
     "        if not os.path.exists(previous):\n"
     "            os.link(path, previous)\n"
     "    os.replace(path + \".tmp\", path)\n",
     "    if keep_last > 1 and os.path.exists(path):\n"
     "        previous = os.path.join(out_dir, f\"ckpt-{read_checkpoint(path)['iter_num']}.pt\")\n"
     "        if not os.path.exists(previous):\n"
     "            shutil.copy(path, previous)\n"
     "    torch.save(state, path)\n"),
    # constitution.py
    ("dpo-rejected-reward-sign", "constitution.py", "rejected_reward = beta * (policy_rejected - ref_rejected)",
     "rejected_reward = beta * (ref_rejected - policy_rejected)"),
    ("dpo-soft-label-sign", "constitution.py", "(1 - p) * F.logsigmoid(-z)", "(1 - p) * F.logsigmoid(z)"),
    ("dpo-reference-own-steps", "constitution.py", "ref_model(x, steps=policy_steps(model))", "ref_model(x)"),
    ("dpo-mean-not-sum-logprob", "constitution.py", "return logp.view(targets.shape).sum(-1)",
     "return logp.view(targets.shape).mean(-1)"),
    # convert.py
    ("hf-export-gate-up-swapped", "convert.py", "\"mlp.c_gate\": \"mlp.gate_proj\",\n               \"mlp.c_fc\": "
     "\"mlp.up_proj\"", "\"mlp.c_gate\": \"mlp.up_proj\",\n               \"mlp.c_fc\": \"mlp.gate_proj\""),
    ("hf-export-expert-w1-w3-swapped", "convert.py", 'kinds = {"w1": weights[:, 0], "w3": weights[:, 1]}',
     'kinds = {"w1": weights[:, 1], "w3": weights[:, 0]}'),
    ("gpt2-conv1d-not-transposed", "convert.py",
     "sd[f\"transformer.h.{i}.{name}.{p}\"] = t.t() if t.dim() == 2 else t",
     "sd[f\"transformer.h.{i}.{name}.{p}\"] = t"),
    ("gpt2-qkv-split-order", "convert.py", "for n, piece in zip(\"qkv\",", "for n, piece in zip(\"kqv\","),
    # data.py
    ("targets-not-shifted", "data.py", "torch.from_numpy(tokens[:, 1:].copy())",
     "torch.from_numpy(tokens[:, :-1].copy())"),
    ("pretrain-mask-off-by-one", "data.py", "starts[r] + 1, block_size)", "starts[r], block_size)"),
    ("pretrain-ranks-same-windows", "data.py", "drawn = ix[rank * batch_size:(rank + 1) * batch_size].numpy()",
     "drawn = ix[:batch_size].numpy()"),
    ("dpo-pairs-rejected-first", "data.py", "pad_batch(chosen + rejected, block_size)",
     "pad_batch(rejected + chosen, block_size)"),
    ("sft-mask-off-by-one", "data.py", "zip(ids[1:], mask[1:])", "zip(ids[1:], mask[:-1])"),
    # evaluation.py
    ("bpb-counts-the-first-token", "evaluation.py", "bytes_per_token(tokenizer, ids[1:].tolist())",
     "bytes_per_token(tokenizer, ids.tolist())"),
    ("acc-norm-per-token", "evaluation.py", "ll / len(ending), ll / len(cont)", "ll / len(cont), ll / len(cont)"),
    # reasoning.py
    ("dre-one-core-step-short", "reasoning.py", "for i in range(r - with_grad, r):",
     "for i in range(r - with_grad + 1, r):"),
    ("dre-backprop-cut-stops-e", "reasoning.py", "s = e + (s - e).detach()", "s = s.detach()"),
    ("dre-inject-keeps-s", "reasoning.py", "return e + (new - s) if self.config.dre_inject else new",
     "return e + new if self.config.dre_inject else new"),
    ("dre-draw-not-seeded-by-step", "reasoning.py", "random.Random(self.iteration).choices(",
     "random.Random().choices("),
    ("dre-exit-one-step-late", "reasoning.py", "done = taken >= limit", "done = taken > limit"),
    # parallel.py, pipeline.py
    ("expert-grads-not-averaged", "moe.py", "flat.div_(dist.get_world_size())", "pass"),
    ("clip-counts-replicated-shards", "parallel.py", "append(local / copies)", "append(local)"),
    ("dre-core-gathered-every-step", "parallel.py", "            if i not in core:\n", "            if True:\n"),
    ("meta-init-skips-construction-draws", "model.py", 'put(built(f"transformer.h.{i}", Block(config, i)))', "pass"),
    ("meta-init-skips-rescaled-projections", "model.py", 'if name.endswith(("c_proj.weight", "mlp.w2")))',
     'if name.endswith("never"))'),
    ("moe-rerun-keeps-its-aux-loss", "moe.py", "if not _recomputing:  # the rerun's loss", "if True:  # the rerun's loss"),
    ("pipeline-tied-grad-not-summed", "pipeline.py",
     "dist.all_reduce(local(end.weight.grad), group=self.tied_group)", "pass"),
    ("pipeline-loss-not-averaged-over-micro-steps", "pipeline.py", "self.weight = 1.0 / (microbatches * accumulation)",
     "self.weight = 1.0 / microbatches"),
    ("pipeline-clip-norm-one-stage", "pipeline.py", "dist.all_reduce(total, group=self.group)", "pass"),
]
# the test files that catch a module's bugs: each mutant meets these first, the rest of the fast suite if it survives
FIRST = {"model.py": ["test_model.py", "test_convert.py"], "muon.py": ["test_model.py"], "moe.py": ["test_moe.py", "test_dryrun.py"],
         "train.py": ["test_train.py"],
         "checkpoint.py": ["test_train.py"], "constitution.py": ["test_constitution.py"],
         "convert.py": ["test_convert.py", "test_model.py"],
         "data.py": ["test_data.py", "test_shards.py", "test_constitution.py"],
         "evaluation.py": ["test_convert.py"], "reasoning.py": ["test_reasoning.py"],
         "parallel.py": ["test_parallel.py"], "pipeline.py": ["test_parallel.py"]}


def tracked_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]


def check(mutant):
    """None if the mutant applies (its old text occurs once in its file), else why not."""
    name, path, old, new = mutant
    try:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            n = f.read().count(old)
    except FileNotFoundError:
        return f"{path} not found"
    return None if n == 1 and old != new else f"its text occurs {n} times in {path}, not once"


def failures(output):
    """Test files with a failure or error in pytest's -rf / summary lines (a collection error counts too)."""
    files = set()
    for line in output.splitlines():
        m = re.match(r"(FAILED|ERROR) (\S+?)(::|\s|$)", line)
        if m:
            files.add(m.group(2))
    return files


def run_suite(copy, args, timeout, stop=False):
    """(exit status, failing test files, seconds) of the fast suite (or `args`, test files) in `copy`; with `stop`
    only until the first failure (-x)."""
    cmd = [sys.executable, "-m", "pytest", *(args or ["tests"]), "-q", "-p", "no:cacheprovider", "--tb=no", "-rfE",
           *["-x"] * stop]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no stale bytecode from one mutant to the next
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "timeout", set(), time.time() - t0
    return proc.returncode, failures(proc.stdout + proc.stderr), time.time() - t0


def fresh_copy(files, mutant=None):
    copy = tempfile.mkdtemp(prefix="mutant-")
    for f in files:
        os.makedirs(os.path.join(copy, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(copy, f))
    if mutant:
        name, path, old, new = mutant
        target = os.path.join(copy, path)
        with open(target, encoding="utf-8") as f:
            text = f.read()
        with open(target, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))
    return copy


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", help="these mutants only")
    p.add_argument("--files", nargs="+", metavar="TEST", help="run these test files (or node ids) only")
    p.add_argument("--list", action="store_true", help="check that every mutant applies, run nothing")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a mutant's run may take (then it is killed)")
    p.add_argument("--all", action="store_true", help="run every test on every mutant, for the table of which files "
                   "catch what (else each run stops at its first failure: minutes instead of hours)")
    a = p.parse_args(argv)
    names = [m[0] for m in MUTANTS]
    unknown = sorted(set(a.only or ()) - set(names))
    if unknown:
        sys.exit(f"error: no mutant named {', '.join(unknown)}; --list shows them")
    chosen = [m for m in MUTANTS if not a.only or m[0] in a.only]
    broken = [(m[0], why) for m in chosen if (why := check(m))]
    for name, why in broken:
        print(f"{name}: does not apply: {why}")
    if a.list:
        for m in chosen:
            print(f"{m[0]:36} {m[1]}")
        print(f"{len(chosen) - len(broken)}/{len(chosen)} mutants apply")
        return 2 if broken else 0
    if broken:
        return 2
    files = tracked_files()
    copy = fresh_copy(files)
    try:
        code, base, secs = run_suite(copy, a.files, a.timeout)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    if code != 0:  # a test that fails without any mutant would "kill" them all
        print(f"error: the tests fail without a mutant (exit {code}): {', '.join(sorted(base)) or '?'}; fix that first")
        return 2
    print(f"unmutated: passed in {secs:.0f} s")
    lived = 0
    for mutant in chosen:
        copy = fresh_copy(files, mutant)
        try:
            first = [os.path.join("tests", f) for f in FIRST.get(mutant[1], ())]
            if a.files or a.all or not first:
                code, failed, secs = run_suite(copy, a.files, a.timeout, stop=not a.all)
            else:  # the module's own tests first; the rest of the fast suite only if the mutant survives them
                code, failed, secs = run_suite(copy, first, a.timeout, stop=True)
                if code == 0:
                    code, failed, more = run_suite(copy, None, a.timeout, stop=True)
                    secs += more
        finally:
            shutil.rmtree(copy, ignore_errors=True)
        if code == 0:
            lived += 1
            verdict = "LIVES"
        else:
            verdict = ", ".join(sorted(failed)) or f"killed (exit {code})"
        print(f"{mutant[0]:36} {verdict}  ({secs:.0f} s)", flush=True)
    print(f"killed {len(chosen) - lived}/{len(chosen)}")
    return 1 if lived else 0


if __name__ == "__main__":
    sys.exit(main())
