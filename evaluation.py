"""
How well a model does, beyond its loss: bits per UTF-8 byte (comparable across tokenizers; train.py logs it as
val_bpb), multiple-choice accuracy as lm-eval scores it (`python convert.py eval`), and the reasoning benchmark
(`python bench.py reasoning`): problems of known difficulty, solved at fixed core steps and with adaptive exit.
"""

import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
from reasoning import spearman

# -----------------------------------------------------------------------------
# bits per byte and multiple choice


def bytes_per_token(tokenizer, ids):
    """UTF-8 bytes of the text `ids` decode to, per token: bits per byte = loss / ln 2 / this."""
    return len(tokenizer.decode([int(i) for i in ids]).encode("utf-8")) / max(1, len(ids))


@torch.no_grad()
def bits_per_byte(model, tokenizer, ids, batch_size=8, device="cpu"):
    """Bits per UTF-8 byte of a token stream, every token but the first predicted once, from non-overlapping
    windows of block_size. Independent of the tokenizer, so character and BPE models compare."""
    T = model.config.block_size
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    nats, n = 0.0, 0
    starts = list(range(0, len(ids) - 1, T))
    for b in range(0, len(starts), batch_size):
        rows = [ids[s:s + T + 1] for s in starts[b:b + batch_size]]
        rows = [r for r in rows if len(r) > 1]
        x = torch.nn.utils.rnn.pad_sequence([r[:-1] for r in rows], batch_first=True).to(device)
        y = torch.nn.utils.rnn.pad_sequence([r[1:] for r in rows], batch_first=True, padding_value=-1).to(device)
        logits, _ = model(x)
        nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum").item()
        n += (y != -1).sum().item()
    return nats / math.log(2) / n / bytes_per_token(tokenizer, ids[1:].tolist())


def read_choices(path):
    """HellaSwag-format JSONL: {"context": str, "endings": [str, ...], "label": int} per line, all checked."""
    items = []
    for lineno, r in data.read_jsonl(path, ("context",)):
        endings, label = r.get("endings"), r.get("label")
        if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)):
            raise ValueError(f"{path}:{lineno}: field 'endings' must be a list of at least two strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise ValueError(f"{path}:{lineno}: field 'label' must be an index into endings, got {label!r}")
        items.append((r["context"], endings, label))
    return items


@torch.no_grad()
def choice_accuracy(model, tokenizer, items, device="cpu"):
    """Multiple-choice accuracy: each ending, after the context and a space, scored by its log-likelihood.
    Three normalisations: acc (the sum: lm-eval's acc), acc_norm (per character of the ending: lm-eval's
    acc_norm), acc_token (the mean per token). An ending's tokens are those that encoding context + " " + ending
    adds to the context's, as lm-eval splits them; padded vocabulary rows are left out of the softmax."""
    n_vocab, hits = tokenizer.vocab_size, {"acc": 0, "acc_norm": 0, "acc_token": 0}
    for context, endings, label in items:
        ctx = tokenizer.encode(context.rstrip())  # lm-eval moves the context's trailing spaces to the ending
        scores = []
        for ending in endings:
            full = tokenizer.encode(context + " " + ending)
            cont = full[len(ctx):]
            x = torch.tensor(full[-model.config.block_size - 1:-1], device=device)[None]
            logp = model(x)[0][0, -len(cont):, :n_vocab].float().log_softmax(-1)
            ll = logp.gather(-1, torch.tensor(cont, device=device)[:, None]).sum().item()
            scores.append((ll, ll / len(ending), ll / len(cont)))
        for k, name in enumerate(hits):
            hits[name] += max(range(len(endings)), key=lambda j: scores[j][k]) == label
    return {name: h / len(items) for name, h in hits.items()}


# -----------------------------------------------------------------------------
# the reasoning benchmark: problems with a difficulty, from data/reasoning/prepare.py


def load_problems(path, per=None):
    """The {"prompt", "answer", "difficulty"} lines of a test.jsonl, checked; the first `per` of each difficulty."""
    problems, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                p = json.loads(line)
                if not (isinstance(p, dict) and isinstance(p.get("prompt"), str) and isinstance(p.get("answer"), str)
                        and isinstance(p.get("difficulty"), int)):
                    raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": str, \"answer\": str, "
                                     f"\"difficulty\": int}}")
                seen[p["difficulty"]] = seen.get(p["difficulty"], 0) + 1
                if per is None or seen[p["difficulty"]] <= per:
                    problems.append(p)
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


@torch.no_grad()
def solve(model, problems, steps=None, threshold=None, batch_size=256):
    """Greedy decoding of each problem's "target" token ids after its "ids" (the prompt), a batch of equal-length
    prompts at a time, with the model's KV cache (as generation runs); a DRE model at `steps` core steps, or up to
    them exiting by `threshold` (as model.generate). Returns per problem: whether every target token came out, and
    the mean core steps of the forwards that produced the answer's tokens, target[lo:hi] (the target may frame the
    answer: a leading space, a closing newline)."""
    right, answer_steps = [None] * len(problems), [None] * len(problems)
    groups = {}
    for i, p in enumerate(problems):
        groups.setdefault((len(p["ids"]), len(p["target"])), []).append(i)
    device = model.lm_head.weight.device
    for (_, n), members in groups.items():
        for start in range(0, len(members), batch_size):
            ix = members[start:start + batch_size]
            idx = torch.tensor([problems[i]["ids"] for i in ix], device=device)
            target = torch.tensor([problems[i]["target"] for i in ix], device=device)
            taken = []  # (B,) per generated token: the steps of the position that predicted it
            observe = (lambda logits, nxt: taken.append(model.depth.last_steps[:, -1])) if model.config.dre else None
            out = model.generate(idx, n, temperature=0.0, observe=observe, steps=steps, threshold=threshold)
            out = out[:, idx.size(1):]
            ok = (out == target).all(1).tolist()
            taken = torch.stack(taken, 1).float() if taken else torch.ones(len(ix), n)
            for j, i in enumerate(ix):
                lo, hi = problems[i]["answer_at"]
                right[i], answer_steps[i] = ok[j], taken[j, lo:hi].mean().item()
    return right, answer_steps


def by_difficulty(problems, values):
    """{difficulty: mean of values over its problems}."""
    out = {}
    for p, v in zip(problems, values):
        out.setdefault(p["difficulty"], []).append(float(v))
    return {d: sum(v) / len(v) for d, v in sorted(out.items())}


@torch.no_grad()
def generation_speed(model, prompts, new_tokens, rounds=3, steps=None, threshold=None):
    """Generated tokens per second at batch 1, `new_tokens` after each prompt (the answer and whatever the model
    writes next), median over rounds, and the mean core steps those tokens ran (steps, threshold: as solve())."""
    times, taken = [], []
    observe = (lambda logits, nxt: taken.append(model.depth.last_steps[0, -1].item())) if model.config.dre else None
    for _ in range(rounds):
        taken.clear()
        t0 = time.perf_counter()
        for p in prompts:
            model.generate(p, new_tokens, temperature=0.0, observe=observe, steps=steps, threshold=threshold)
        times.append(time.perf_counter() - t0)
    return new_tokens * len(prompts) / sorted(times)[len(times) // 2], sum(taken) / len(taken) if taken else 1.0


def forward_flops_per_token(model, mean_steps, seq_len):
    """Forward FLOPs per token: 2 per parameter outside the core and attention there, plus mean_steps core steps."""
    d, L = model.config.n_embd, model.config.n_layer
    if not model.config.dre:
        return 2 * model.num_params(active=True) + 4 * L * d * seq_len
    core = model.depth
    outside = 2 * (model.num_params(active=True) - core.step_params) + 4 * (L - core.n_core) * d * seq_len
    return outside + mean_steps * core.core_flops_per_step(seq_len)


def benchmark(model, problems, train_max, step_counts, threshold, select=None, gen_prompts=16, gen_tokens=48,
              rounds=3):
    """problems: test.jsonl's, each with solve()'s "ids", "target" and "answer_at" added. Accuracy per difficulty
    at each fixed step count and with adaptive exit (up to the largest count), steps per answer token against
    difficulty, FLOPs and generation speed (the largest count against exit). Returns (rows, summary): rows[setting]
    = {"acc": {difficulty: accuracy}, "steps": {difficulty: mean steps per answer token}, "all", "flops", "tok_s"},
    summary the JSON line's values. ood_acc is the test accuracy at the step count best on `select` (select.jsonl's
    problems, held apart from the test's); without them, at the count best on the test itself, which flatters it."""
    cfg = model.config
    settings = [(f"{r} steps", r, 0.0) for r in (step_counts if cfg.dre else [1])]  # (name, steps, threshold)
    if cfg.dre:
        settings.append((f"exit {cfg.dre_exit} < {threshold:g}", max(step_counts), threshold))
    rows, answer_steps = {}, {}
    for name, r, t in settings:
        right, steps = solve(model, problems, r, t)
        rows[name] = {"acc": by_difficulty(problems, right), "steps": by_difficulty(problems, steps),
                      "all": sum(right) / len(right)}
        answer_steps[name] = steps
    # generation speed at the largest count and with exit, on prompts drawn from every difficulty
    step = max(1, len(problems) // gen_prompts)
    prompts = [torch.tensor([p["ids"]], device=model.lm_head.weight.device) for p in problems[::step]]
    top, ext = settings[-2] if cfg.dre else settings[0], settings[-1]
    speed = {}
    for name, r, t in dict.fromkeys([top, ext]):  # one setting for a dense model
        speed[name] = generation_speed(model, prompts, gen_tokens, rounds, r, t)
    seq = len(problems[0]["ids"]) + gen_tokens // 2  # the mean number of keys a generated token attends to
    flops = {name: forward_flops_per_token(model, s, seq) for name, (_, s) in speed.items()}
    for name in rows:
        rows[name]["flops"] = flops.get(name)
        rows[name]["tok_s"] = speed.get(name, (None,))[0]

    def mean_acc(row, keep):  # over the difficulties kept, each weighing the same
        acc = [a for d, a in row["acc"].items() if keep(d)]
        return sum(acc) / len(acc) if acc else None

    iid = lambda row: mean_acc(row, lambda d: d <= train_max)  # noqa: E731
    ood = lambda row: mean_acc(row, lambda d: d >= 1.5 * train_max)  # noqa: E731 (the targets' 1.5-2x)
    fixed = [r for _, r, _ in settings[:len(settings) - cfg.dre]]
    chooser = {r: ood({"acc": by_difficulty(select, solve(model, select, r, 0.0)[0])}) if select else
               ood(rows[f"{r} steps"]) for r in fixed}
    ood_steps = max(fixed, key=lambda r: chooser[r] or 0)  # (ties: the fewer steps)
    train_r = round(cfg.dre_mean_steps) if cfg.dre else 1
    default = rows[f"{min(cfg.max_reasoning_steps, max(step_counts)) if cfg.dre else 1} steps"]
    summary = {"id_acc": iid(default), "ood_acc": ood(rows[f"{ood_steps} steps"]), "ood_steps": ood_steps,
               "ood_steps_chosen_on": "select" if select else "test",
               "ood_acc_train_steps": ood(rows[f"{train_r if cfg.dre else 1} steps"]),
               "exit_step_ratio": 1.0, "exit_acc_drop": 0.0, "rho_steps_difficulty": None, "exit_speedup": 1.0,
               "flop_ratio": 1.0}
    if cfg.dre:
        e, m = rows[ext[0]], rows[top[0]]
        steps = torch.tensor(answer_steps[ext[0]])
        rho = spearman(steps, torch.tensor([float(p["difficulty"]) for p in problems]))
        summary.update(exit_step_ratio=steps.mean().item() / max(step_counts), exit_acc_drop=m["all"] - e["all"],
                       rho_steps_difficulty=rho if math.isfinite(rho) else None,  # None: every answer ran alike
                       exit_speedup=speed[ext[0]][0] / speed[top[0]][0], flop_ratio=flops[top[0]] / flops[ext[0]],
                       ood_acc_exit=ood(e), id_acc_exit=iid(e))
    return rows, summary
