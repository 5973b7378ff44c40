"""
Constitutional AI (Bai et al. 2022) with DPO (Rafailov et al. 2023) in place of PPO: stage 1 (revise) writes revised
answers, an SFT set; stage 2 (label) writes AI-feedback preference pairs, a DPO set. With C the constitution
(data/constitutions/helpful_harmless.json) and P a JSONL of prompts (data/constitutions/prompts_demo.jsonl):

    python constitution.py validate C
    python train.py ... --mode=sft --init_from=out-base --train_jsonl=chat.jsonl --out_dir=out-sft    # a chat model
    python constitution.py revise --out_dir out-sft --prompts P --constitution C --out revisions.jsonl --rounds 2
    python train.py ... --mode=sft --init_from=out-sft --train_jsonl=revisions.jsonl --out_dir=out-sl  # stage 1
    python constitution.py label --out_dir out-sl --prompts P --constitution C --out prefs.jsonl [--judge JUDGE]
    python train.py ... --mode=dpo --init_from=out-sl --train_jsonl=prefs.jsonl --out_dir=out-rl      # stage 2

(config/finetune_shakespeare_char.py holds the "..." for the CPU default model; add --choices=A,B to `label` there.)
Both stages append one JSON line per prompt and flush it, so an interrupted run resumes where it stopped.
"""

import argparse
import difflib
import json
import math
import os
import random
import sys
from contextlib import nullcontext

import torch

from chat import HUMAN, JSON_TYPES, MARKERS, Tokenizer, clean_reply, encode_chat, pad_batch, read_jsonl, \
    sequence_logprobs, type_name
# temporary, until train.py imports them from chat.py:
from model import load_run
from parallel import pick_device

# -----------------------------------------------------------------------------
# constitutions


class ConstitutionError(ValueError):
    """A constitution file that is not valid; the message names the file, the principle and the field."""


PRINCIPLE_FIELDS = {"id": str, "category": str, "critique_request": str, "revision_request": str}
OPTIONAL_FIELDS = {"weight": (int, float), "comparison_question": str}
TOP_FIELDS = {"name": str, "principles": list}


def load_constitution(path):
    """The constitution in a JSON file, checked, with each principle's weight filled in."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConstitutionError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConstitutionError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        c = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConstitutionError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(c, dict):
        raise ConstitutionError(f"{path}: expected a JSON object with 'name' and 'principles', got {type_name(c)}")
    _check_fields(c, TOP_FIELDS, {"description": str}, path)
    if not c["name"].strip():
        raise ConstitutionError(f"{path}: 'name' must not be empty")
    if not c["principles"]:
        raise ConstitutionError(f"{path}: 'principles' is an empty list; a constitution needs at least one")
    first_use = {}
    for i, p in enumerate(c["principles"]):
        where = f"{path}: principles[{i}]"
        if not isinstance(p, dict):
            raise ConstitutionError(f"{where}: expected an object, got {type_name(p)}")
        if isinstance(p.get("id"), str) and p["id"].strip():
            where += f" (id {p['id']!r})"
        _check_fields(p, PRINCIPLE_FIELDS, OPTIONAL_FIELDS, where)
        for key, value in p.items():
            if isinstance(value, str) and not value.strip():
                raise ConstitutionError(f"{where}: field '{key}' is empty; expected some text")
        weight = p.setdefault("weight", 1.0)
        if not (math.isfinite(weight) and weight > 0):  # a boolean was refused as not a number
            raise ConstitutionError(f"{where}: field 'weight' must be a positive number, got {weight!r}")
        if p["id"] in first_use:
            raise ConstitutionError(f"{where}: duplicate id {p['id']!r} (already used by "
                                    f"principles[{first_use[p['id']]}])")
        first_use[p["id"]] = i
    return c


def _check_fields(obj, required, optional, where):
    """No unknown field (a typo gets a suggestion), no missing one, each of its type; a boolean is not a number."""
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
            raise ConstitutionError(f"{where}: field '{key}' must be {JSON_TYPES.get(kind, 'a number')}, "
                                    f"got {type_name(obj[key])}")


def sample_principle(constitution, rng):
    """One principle, drawn with probability proportional to its weight."""
    principles = constitution["principles"]
    return rng.choices(principles, weights=[p["weight"] for p in principles])[0]


def comparison_question(principle):
    # a principle without its own multiple-choice question is asked through its revision request
    return principle.get("comparison_question") or \
        f"Which of these replies better does what this asks: {principle['revision_request']}"


# -----------------------------------------------------------------------------
# models, generation, and the two stages


def load_model(out_dir, device="cpu"):
    """The model in out_dir/ckpt.pt and its tokenizer, from data/<dataset>/meta.json under the working directory
    (as sample.py finds it); without one, GPT-2's tokenizer, as train.py assumes."""
    model, run = load_run(out_dir)
    dataset = run["dataset"]
    meta_path = os.path.join("data", dataset, "meta.json")
    meta = {"tokenizer": "gpt2"}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    elif model.config.vocab_size < 50257:
        raise FileNotFoundError(f"{meta_path} not found, and a vocabulary of {model.config.vocab_size} is not "
                                f"GPT-2's: run from the directory that holds data/{dataset}")
    return model.to(device), Tokenizer(meta)


@torch.no_grad()
def generate_reply(model, tokenizer, context_ids, max_new_tokens=128, temperature=1.0, top_k=None, chunk=32):
    """The reply the model writes after context_ids, up to END. generate() runs in chunks of tokens with its KV
    cache, and stops once a chunk holds a marker; re-reading the context once per chunk costs little next to
    generating token by token, and the model's generate() stays as it is."""
    device = next(model.parameters()).device
    idx = torch.tensor([context_ids], dtype=torch.long, device=device)
    new = []
    while len(new) < max_new_tokens:
        out = model.generate(idx, min(chunk, max_new_tokens - len(new)), temperature=temperature, top_k=top_k)
        new += out[0, idx.size(1):].tolist()
        idx = out
        if any(m in tokenizer.decode(new) for m in MARKERS):
            break
    return clean_reply(tokenizer.decode(new))


def revise_record(model, tokenizer, prompt, constitution, rounds, rng, **gen):
    """Stage 1 for one prompt: an answer, then `rounds` times a critique under a principle drawn from the
    constitution and a revision. Each round is a three-turn conversation: the prompt and the current answer, the
    critique request and the critique, the revision request and the revision."""
    def reply(request, history=()):
        return generate_reply(model, tokenizer, encode_chat(tokenizer, request, history=history)[0], **gen)

    response = reply(prompt)
    record = {"prompt": prompt, "initial_response": response, "rounds": []}
    for _ in range(rounds):
        principle = sample_principle(constitution, rng)
        critique = reply(principle["critique_request"], [(prompt, response)])
        revision = reply(principle["revision_request"],
                         [(prompt, response), (principle["critique_request"], critique)])
        record["rounds"].append({"principle": principle["id"], "response": response, "critique": critique,
                                 "revision": revision})
        response = revision
    record["response"] = response  # with "prompt", an SFT example
    return record


def comparison_text(prompt, question, a, b, choices):
    """The multiple-choice question of stage 2 (the format of the paper's feedback model). Plain text, not a chat
    turn: a pretrained judge reads it as a document, and it must hold two answers the chat markers would cut."""
    return (f"Consider the following conversation between a human and an assistant:\n\n{HUMAN}{prompt}\n\n"
            f"{question}\nOptions:\n{choices[0]} {a}\n{choices[1]} {b}\nThe answer is:")


@torch.no_grad()
def choice_logprobs(model, context_ids, choice_ids):
    """log p(choice | context) for each choice (a list of token-id lists), summed over the choice's tokens: (n,).
    A context longer than the window keeps its end, which holds the options and the question's last words."""
    block_size = model.config.block_size
    if max(map(len, choice_ids)) >= block_size:
        raise ValueError(f"a choice of {max(map(len, choice_ids))} tokens does not fit the judge's window "
                         f"of {block_size}")
    x, y = pad_batch([(context_ids + ids, [0] * len(context_ids) + [1] * len(ids)) for ids in choice_ids], block_size)
    device = next(model.parameters()).device
    return sequence_logprobs(model(x.to(device))[0], y.to(device)).cpu()


def label_record(policy, judge, prompt, constitution, rng, choices=("(A)", "(B)"), **gen):
    """Stage 2 for one prompt: two sampled answers, compared by the judge under a principle drawn from the
    constitution. p = softmax of the two choices' log-probabilities; chosen is the answer with p >= 0.5."""
    (model, tokenizer), (judge_model, judge_tokenizer) = policy, judge
    context = encode_chat(tokenizer, prompt)[0]
    a, b = (generate_reply(model, tokenizer, context, **gen) for _ in range(2))
    principle = sample_principle(constitution, rng)
    question = judge_tokenizer.encode(comparison_text(prompt, comparison_question(principle), a, b, choices))
    logp = choice_logprobs(judge_model, question, [judge_tokenizer.encode(f" {c}") for c in choices])
    p_a = torch.softmax(logp.double(), 0)[0].item()
    chosen, rejected, p = (a, b, p_a) if p_a >= 0.5 else (b, a, 1 - p_a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "p_chosen": p, "principle": principle["id"]}


# -----------------------------------------------------------------------------
# resumable output: one JSON line per prompt, appended and flushed


def open_resumable(path, prompts):
    """Opens `path` for appending and returns (file, indices of the prompts already done). A last line without its
    newline, or that does not parse, is what a crash mid-write leaves: it is cut off and its prompt done again.
    Anything else wrong (a bad earlier line, a duplicate, a record of another prompt) is an error, not repaired."""
    done, keep, data = set(), 0, b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
    for lineno, line in enumerate(data.splitlines(keepends=True), 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            r = json.loads(line)
            i = r["index"]
        except (ValueError, KeyError, TypeError):
            if keep + len(line) == len(data):  # the last line
                break
            raise ValueError(f"{path}:{lineno}: not a record of this tool; move the file away or fix the line")
        if not (isinstance(i, int) and 0 <= i < len(prompts)) or r.get("prompt") != prompts[i]:
            raise ValueError(f"{path}:{lineno}: record {i!r} does not match the prompts file (a different "
                             f"prompts file?); write to a new --out")
        if i in done:
            raise ValueError(f"{path}:{lineno}: a second record for prompt {i}")
        done.add(i)
        keep += len(line)
    if keep < len(data):
        print(f"{path}: dropping an incomplete last line ({len(data) - keep} bytes) left by an interrupted run")
        with open(path, "r+b") as f:
            f.truncate(keep)
    return open(path, "a", encoding="utf-8"), done


def append_record(f, record):
    f.write(json.dumps(record, ensure_ascii=False) + "\n")  # one write: a crash leaves at most a torn last line
    f.flush()
    os.fsync(f.fileno())


def run_stage(path, prompts, make_record, seed):
    """Calls make_record(prompt, rng) for every prompt without a record in `path` yet, appending each record.
    The random streams are seeded per prompt, so a resumed run writes what an uninterrupted one would have."""
    f, done = open_resumable(path, prompts)
    with f:
        todo = [i for i in range(len(prompts)) if i not in done]
        if done:
            print(f"{path}: {len(done)} of {len(prompts)} prompts already done, {len(todo)} to go")
        for n, i in enumerate(todo, 1):
            rng = random.Random(f"{seed}:{i}")
            torch.manual_seed(rng.getrandbits(63))
            append_record(f, {"index": i, **make_record(prompts[i], rng)})
            print(f"{n}/{len(todo)}: prompt {i} done")


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", help="check a constitution file").add_argument("file")
    stages = {"revise": "stage 1: answers, critiques and revisions (an SFT set)",
              "label": "stage 2: AI-feedback preference pairs (a DPO set)"}
    for name, what in stages.items():
        s = sub.add_parser(name, help=what)
        s.add_argument("--out_dir", required=True, help="the run whose ckpt.pt answers the prompts")
        s.add_argument("--prompts", required=True, help='JSONL, one {"prompt": ...} per line')
        s.add_argument("--constitution", required=True)
        s.add_argument("--out", required=True, help="JSONL to write (appended to: a rerun resumes)")
        s.add_argument("--max_new_tokens", type=int, default=128, help="longest reply, in tokens")
        s.add_argument("--temperature", type=float, default=1.0)
        s.add_argument("--top_k", type=int, default=0, help="0: no top-k cut")
        s.add_argument("--seed", type=int, default=1337)
        s.add_argument("--device", default="auto")
    sub.choices["revise"].add_argument("--rounds", type=int, default=1, help="critique-revision rounds")
    sub.choices["label"].add_argument("--judge", help="the run whose ckpt.pt compares answers (default: --out_dir)")
    sub.choices["label"].add_argument("--choices", default="(A),(B)",
                                      help="the two answer labels, comma-separated (A,B for vocabularies without "
                                           "parentheses)")
    args = parser.parse_args(argv)
    try:
        constitution = load_constitution(args.file if args.command == "validate" else args.constitution)
    except ConstitutionError as e:
        sys.exit(f"error: {e}")
    if args.command == "validate":
        cats = sorted({p["category"] for p in constitution["principles"]})
        print(f"ok: {constitution['name']!r}, {len(constitution['principles'])} principles "
              f"(categories: {', '.join(cats)})")
        return
    if args.command == "revise" and args.rounds < 1:
        sys.exit(f"error: --rounds must be at least 1, got {args.rounds}")
    device = pick_device(args.device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else nullcontext()
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)
    try:
        policy = load_model(args.out_dir, device)
        judge = load_model(args.judge, device) if args.command == "label" and args.judge else policy
        prompts = [r["prompt"] for r in read_jsonl(args.prompts, ("prompt",))]
        for i, prompt in enumerate(prompts):  # fail now rather than after an hour of generation
            try:
                encode_chat(policy[1], prompt)
            except ValueError as e:
                raise ValueError(f"{args.prompts}: prompt {i}: {e}") from None
        check_principles(constitution, (judge if args.command == "label" else policy)[1], args.command)
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
        with autocast:
            run_stage(args.out, prompts, make, args.seed)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def check_principles(constitution, tokenizer, stage):
    """Every principle text that `stage` ('revise' or 'label') shows a model must be in that model's vocabulary:
    a character-level one has only 65 characters, and finding out at the tenth prompt wastes nine."""
    fields = ("critique_request", "revision_request") if stage == "revise" else ("comparison_question",)
    for p in constitution["principles"]:
        for field in fields:
            try:
                tokenizer.encode(comparison_question(p) if field == "comparison_question" else p[field])
            except ValueError as e:
                raise ValueError(f"principle {p['id']!r}, field '{field}': {e}") from None


if __name__ == "__main__":
    main()
