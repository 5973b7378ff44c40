"""Constitutional AI (Bai et al. 2022) with DPO (Rafailov et al. 2023) in place of PPO: stage 1 (revise) writes
revised answers, an SFT set; stage 2 (label) AI-feedback preference pairs, a DPO set, each one JSON line per prompt so
that an interrupted run resumes. The DPO loss that stage 2 trains with (train.py mode='dpo') is here too. With C a
constitution and P a JSONL of prompts (both in data/constitutions/), and the "..." from
config/finetune_shakespeare_char.py (add --choices=A,B to `label` there):

    python constitution.py validate C
    python train.py ... --mode=sft --init_from=out-base --train_jsonl=chat.jsonl --out_dir=out-sft    # a chat model
    python constitution.py revise --out_dir out-sft --prompts P --constitution C --out revisions.jsonl --rounds 2
    python train.py ... --mode=sft --init_from=out-sft --train_jsonl=revisions.jsonl --out_dir=out-sl  # stage 1
    python constitution.py label --out_dir out-sl --prompts P --constitution C --out prefs.jsonl [--judge JUDGE]
    python train.py ... --mode=dpo --init_from=out-sl --train_jsonl=prefs.jsonl --out_dir=out-rl      # stage 2
"""

import argparse
import copy
import difflib
import json
import math
import os
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import hardware
from convert import load_run
from reasoning import RecurrentDepth


class ConstitutionError(ValueError):
    """A constitution file that is not valid; the message names the file, the principle and the field."""


def load_constitution(path):
    """The constitution in a JSON file, checked, with each principle's weight and comparison question filled in."""
    try:
        c = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConstitutionError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConstitutionError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConstitutionError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    _check_fields(c, "a JSON object with 'name' and 'principles'", {"name": str, "principles": list},
                  {"description": str}, path)
    if not c["name"].strip():
        raise ConstitutionError(f"{path}: 'name' must not be empty")
    if not c["principles"]:
        raise ConstitutionError(f"{path}: 'principles' is an empty list; a constitution needs at least one")
    seen = {}
    for i, p in enumerate(c["principles"]):
        where = f"{path}: principles[{i}]"
        if isinstance(p, dict) and isinstance(p.get("id"), str) and p["id"].strip():
            where += f" (id {p['id']!r})"
        _check_fields(p, "an object", {"id": str, "category": str, "critique_request": str, "revision_request": str},
                      {"weight": (int, float), "comparison_question": str}, where)
        for key, value in p.items():
            if isinstance(value, str) and not value.strip():
                raise ConstitutionError(f"{where}: field '{key}' is empty; expected some text")
        weight = p.setdefault("weight", 1.0)
        if not (math.isfinite(weight) and weight > 0):  # a boolean was refused as not a number
            raise ConstitutionError(f"{where}: field 'weight' must be a positive number, got {weight!r}")
        if p["id"] in seen:
            raise ConstitutionError(f"{where}: duplicate id {p['id']!r} (already used by principles[{seen[p['id']]}])")
        seen[p["id"]] = i
        p.setdefault("comparison_question",  # without one, a principle is asked through its revision request
                     f"Which of these replies better does what this asks: {p['revision_request']}")
    return c


def _check_fields(obj, what, required, optional, where):
    """An object (`what`), with no unknown field (a typo gets a suggestion), no missing one, each of its type."""
    if not isinstance(obj, dict):
        raise ConstitutionError(f"{where}: expected {what}, got {data.type_name(obj)}")
    fields = {**required, **optional}
    for key in obj:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(fields)}"
            raise ConstitutionError(f"{where}: unknown field '{key}'{hint}")
    for key in required:
        if key not in obj:
            raise ConstitutionError(f"{where}: missing field '{key}'")
    for key, kind in fields.items():
        if key in obj and (not isinstance(obj[key], kind) or isinstance(obj[key], bool)):
            raise ConstitutionError(f"{where}: field '{key}' must be {data.JSON_TYPES.get(kind, 'a number')}, "
                                    f"got {data.type_name(obj[key])}")


def sample_principle(constitution, rng):
    return rng.choices(constitution["principles"], weights=[p["weight"] for p in constitution["principles"]])[0]


def check_principles(constitution, tokenizer, stage):
    """Fails now, not at the tenth prompt, if `stage`'s model cannot read a principle text it will be shown."""
    fields = ("critique_request", "revision_request") if stage == "revise" else ("comparison_question",)
    for p in constitution["principles"]:
        for field in fields:
            try:
                tokenizer.encode(p[field])
            except ValueError as e:
                raise ValueError(f"principle {p['id']!r}, field '{field}': {e}") from None


@torch.no_grad()
def generate_reply(model, tokenizer, context_ids, max_new_tokens=128, temperature=1.0, top_k=None, chunk=32):
    """The reply after context_ids, up to END: generated in chunks, so the model's generate() stays as it is."""
    idx = torch.tensor([context_ids], dtype=torch.long, device=next(model.parameters()).device)
    new = []
    while len(new) < max_new_tokens and not any(m in tokenizer.decode(new) for m in data.MARKERS):
        out = model.generate(idx, min(chunk, max_new_tokens - len(new)), temperature=temperature, top_k=top_k)
        new, idx = new + out[0, idx.size(1):].tolist(), out
    return data.clean_reply(tokenizer.decode(new))


def revise_record(model, tokenizer, prompt, constitution, rounds, rng, **gen):
    """Stage 1 for one prompt: an answer, then `rounds` times a critique under a drawn principle and a revision."""
    def reply(request, history=()):
        return generate_reply(model, tokenizer, data.encode_chat(tokenizer, request, history=history)[0], **gen)
    response = reply(prompt)
    record = {"prompt": prompt, "initial_response": response, "rounds": []}
    for _ in range(rounds):
        principle = sample_principle(constitution, rng)
        critique = reply(principle["critique_request"], [(prompt, response)])
        revision = reply(principle["revision_request"], [(prompt, response), (principle["critique_request"], critique)])
        record["rounds"].append({"principle": principle["id"], "response": response, "critique": critique,
                                 "revision": revision})
        response = revision
    return {**record, "response": response}  # with "prompt", an SFT example


def comparison_text(prompt, question, a, b, choices):
    """Stage 2's question, as in the paper: plain text, not a chat turn, for it holds answers the markers would cut."""
    return (f"Consider the following conversation between a human and an assistant:\n\n{data.HUMAN}{prompt}\n\n"
            f"{question}\nOptions:\n{choices[0]} {a}\n{choices[1]} {b}\nThe answer is:")


@torch.no_grad()
def label_record(policy, judge, prompt, constitution, rng, choices=("(A)", "(B)"), **gen):
    """Stage 2 for one prompt: two answers, and the judge's softmax over its log p(choice | question) as p_chosen."""
    (model, tokenizer), (judge_model, judge_tokenizer) = policy, judge
    a, b = (generate_reply(model, tokenizer, data.encode_chat(tokenizer, prompt)[0], **gen) for _ in range(2))
    principle = sample_principle(constitution, rng)
    question = judge_tokenizer.encode(comparison_text(prompt, principle["comparison_question"], a, b, choices))
    answers, block_size = [judge_tokenizer.encode(f" {c}") for c in choices], judge_model.config.block_size
    if max(map(len, answers)) >= block_size:
        raise ValueError(f"a choice of {max(map(len, answers))} tokens does not fit the judge's window of {block_size}")
    # a question longer than the window keeps its end: the options and the question's last words
    x, y = data.pad_batch([(question + ids, [0] * len(question) + [1] * len(ids)) for ids in answers], block_size)
    device = next(judge_model.parameters()).device
    p_a = torch.softmax(sequence_logprobs(judge_model(x.to(device))[0], y.to(device)).double(), 0)[0].item()
    chosen, rejected, p = (a, b, p_a) if p_a >= 0.5 else (b, a, 1 - p_a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "p_chosen": p, "principle": principle["id"]}


def open_resumable(path, prompts):
    """`path` opened to append, and the prompts done; a torn last line (a crash mid-write) is cut, all else refused."""
    done = set()
    raw = Path(path).read_bytes() if os.path.exists(path) else b""
    lines = raw.splitlines(keepends=True)
    for lineno, line in enumerate(lines, 1):
        try:
            r = json.loads(line) if line.endswith(b"\n") else None  # a line without its newline is torn
            i = r["index"]
        except (ValueError, KeyError, TypeError):
            if lineno < len(lines):
                raise ValueError(f"{path}:{lineno}: not a record of this tool; move the file away or fix the line")
            print(f"{path}: dropping an incomplete last line ({len(line)} bytes) left by an interrupted run")
            os.truncate(path, len(raw) - len(line))
            break
        if not (isinstance(i, int) and 0 <= i < len(prompts)) or r.get("prompt") != prompts[i]:
            raise ValueError(f"{path}:{lineno}: record {i!r} does not match the prompts file (a different "
                             f"prompts file?); write to a new --out")
        if i in done:
            raise ValueError(f"{path}:{lineno}: a second record for prompt {i}")
        done.add(i)
    return open(path, "a", encoding="utf-8"), done


# -----------------------------------------------------------------------------
# DPO: the loss stage 2 trains with (train.py mode='dpo')


def sequence_logprobs(logits, targets):
    """Sum over each row of log p(target) for the targets that are not -1 (the response tokens): (B,)."""
    if hasattr(logits, "device_mesh"):  # tensor parallelism: logits split by vocabulary (parallel.py)
        from parallel import vocab_parallel_loss
        logp = -vocab_parallel_loss(logits, targets, reduction="none")
    else:
        logp = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    return logp.view(targets.shape).sum(-1)  # ignored positions contribute 0


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, p=1.0):
    """-(p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)), h the log-ratio margin, and the implicit rewards.
    p < 1 (conservative DPO) keeps a finite optimum, beta h = log(p / (1 - p)), on a pair that may be mislabelled."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    z = chosen_reward - rejected_reward
    loss = -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z)).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()


def preference_accuracy(margins):
    """Share of pairs with a positive reward margin; a tie counts half, so a policy equal to its reference is 0.5."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean()


def policy_steps(model):
    """The core steps each token of a DRE policy's last forward ran (an int when all ran the same), so that its
    reference runs at the same depth: a reference that drew r again, or exited by its threshold while the policy
    trained at a drawn r, would differ from an identical policy and move the loss off ln 2. None for a dense model.
    The policy may be wrapped (DDP, torch.compile): its RecurrentDepth is found among its modules."""
    depth = next((m for m in model.modules() if isinstance(m, RecurrentDepth)), None)
    if depth is None or depth.last_steps is None:
        return None
    return depth.last_r if depth.last_r is not None else depth.last_steps  # (no host sync to tell them apart)


def dpo_forward(model, ref_model, x, y, p, beta, soft_labels=False):
    """DPO loss and statistics of a batch of finetune_batch's pairs: chosen rows, then rejected rows. The frozen
    reference runs each token at the policy's core steps (policy_steps)."""
    policy = sequence_logprobs(model(x)[0], y)
    with torch.no_grad():
        ref = sequence_logprobs(ref_model(x, steps=policy_steps(model))[0], y)
    loss, chosen, rejected = dpo_loss(*policy.chunk(2), *ref.chunk(2), beta, p if soft_labels else 1.0)
    margin = chosen - rejected
    return loss, {"accuracy": preference_accuracy(margin), "margin": margin.mean(),
                  "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}


def describe_dpo(stats):  # dpo_forward's statistics, as floats
    return (f"dpo: accuracy {stats['accuracy']:.3f}, reward margin {stats['margin']:.4f}, "
            f"chosen {stats['chosen_reward']:.4f}, rejected {stats['rejected_reward']:.4f}")


def reference_model(source, device):
    """DPO's frozen reference: the model in source/ckpt.pt when source is a directory, else a copy of the model."""
    ref = load_run(source)[0] if isinstance(source, str) else copy.deepcopy(source)
    return ref.requires_grad_(False).eval().to(device)



# -----------------------------------------------------------------------------
# the command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", help="check a constitution file").add_argument("constitution", metavar="file")
    stage = argparse.ArgumentParser(add_help=False)  # what both stages take
    stage.add_argument("--out_dir", required=True, help="the run whose ckpt.pt answers the prompts")
    stage.add_argument("--prompts", required=True, help='JSONL, one {"prompt": ...} per line')
    stage.add_argument("--constitution", required=True)
    stage.add_argument("--out", required=True, help="JSONL to write (appended to: a rerun resumes)")
    stage.add_argument("--max_new_tokens", type=int, default=128, help="longest reply, in tokens")
    stage.add_argument("--temperature", type=float, default=1.0)
    stage.add_argument("--top_k", type=int, default=0, help="0: no top-k cut")
    stage.add_argument("--seed", type=int, default=1337)
    stage.add_argument("--device", default="auto")
    revise = sub.add_parser("revise", parents=[stage], help="stage 1: answers, critiques and revisions (an SFT set)")
    revise.add_argument("--rounds", type=int, default=1, help="critique-revision rounds")
    label = sub.add_parser("label", parents=[stage], help="stage 2: AI-feedback preference pairs (a DPO set)")
    label.add_argument("--judge", help="the run whose ckpt.pt compares answers (default: --out_dir)")
    label.add_argument("--choices", default="(A),(B)", help="two labels, comma-separated (A,B without parentheses)")
    args = parser.parse_args(argv)
    try:
        constitution = load_constitution(args.constitution)
        if args.command == "validate":
            cats = ", ".join(sorted({p["category"] for p in constitution["principles"]}))
            print(f"ok: {constitution['name']!r}, {len(constitution['principles'])} principles (categories: {cats})")
            return
        if args.command == "revise" and args.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
        for bad, message in ((args.max_new_tokens < 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"),
                             (args.temperature < 0, f"--temperature must be >= 0, got {args.temperature}"),
                             (args.top_k < 0, f"--top_k must be >= 0 (0: no cut), got {args.top_k}")):
            if bad:
                raise ValueError(message)
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a directory; give a JSONL file to write")
        device = hardware.pick_device(args.device)
        policy = load_run(args.out_dir, device)[:2]  # (model, tokenizer)
        judge = load_run(args.judge, device)[:2] if args.command == "label" and args.judge else policy
        prompts = [r["prompt"] for _, r in data.read_jsonl(args.prompts, ("prompt",))]
        for i, prompt in enumerate(prompts):  # fail now rather than after an hour of generation
            try:
                data.encode_chat(policy[1], prompt)
            except ValueError as e:
                raise ValueError(f"{args.prompts}: prompt {i}: {e}") from None
        check_principles(constitution, judge[1], args.command)  # the judge is the policy in revise
        gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)
        if args.command == "revise":
            make = lambda prompt, rng: revise_record(*policy, prompt, constitution, args.rounds, rng, **gen)
        else:
            choices = tuple(c.strip() for c in args.choices.split(","))
            if len(choices) != 2 or not all(choices) or choices[0] == choices[1]:
                raise ValueError(f"--choices must be two different labels, comma-separated, got {args.choices!r}")
            try:
                [judge[1].encode(f" {c}") for c in choices]
            except ValueError as e:
                raise ValueError(f"the judge cannot write the choices {choices}: {e}; try --choices=A,B") from None
            make = lambda prompt, rng: label_record(policy, judge, prompt, constitution, rng, choices, **gen)
        f, done = open_resumable(args.out, prompts)
        todo = [i for i in range(len(prompts)) if i not in done]
        if done:
            print(f"{args.out}: {len(done)} of {len(prompts)} prompts already done, {len(todo)} to go")
        with f, torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
            for n, i in enumerate(todo, 1):
                rng = random.Random(f"{args.seed}:{i}")  # seeded per prompt: a resumed run writes the same records
                torch.manual_seed(rng.getrandbits(63))
                f.write(json.dumps({"index": i, **make(prompts[i], rng)}, ensure_ascii=False) + "\n")  # one write
                f.flush()
                os.fsync(f.fileno())  # a crash leaves at most a torn last line
                print(f"{n}/{len(todo)}: prompt {i} done")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
