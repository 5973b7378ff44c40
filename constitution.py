"""
Constitutional AI (Bai et al. 2022) with DPO (Rafailov et al. 2023) in place of PPO. With C the constitution
(data/constitutions/helpful_harmless.json) and P a JSONL of prompts (data/constitutions/prompts_demo.jsonl):

    python constitution.py validate C
    python train.py ... --mode=sft --init_from=out-base --train_jsonl=chat.jsonl --out_dir=out-sft    # a chat model
    python constitution.py revise --out_dir out-sft --prompts P --constitution C --out revisions.jsonl --rounds 2
    python train.py ... --mode=sft --init_from=out-sft --train_jsonl=revisions.jsonl --out_dir=out-sl  # stage 1
    python constitution.py label --out_dir out-sl --prompts P --constitution C --out prefs.jsonl [--judge JUDGE]
    python train.py ... --mode=dpo --init_from=out-sl --train_jsonl=prefs.jsonl --out_dir=out-rl      # stage 2

(config/finetune_shakespeare_char.py holds the "..." for the CPU default model; add --choices=A,B to `label` there.)

A constitution is a JSON file: a `name` and a list of `principles`, each with an `id`, a `category`, a
`critique_request` and a `revision_request`, and optionally a `comparison_question` (the multiple-choice question of
stage 2) and a `weight` (how often it is drawn, relative to the others; default 1).

Stage 1 (revise): the model answers each prompt, critiques its answer under a principle drawn at random, and revises
it; N rounds, each round from the prompt and the latest revision. The final revisions are an SFT set.
Stage 2 (label): the model answers each prompt twice; the model, or a judge checkpoint, is asked which answer better
satisfies a principle, as a multiple-choice question, and the probabilities it gives the two choices become a soft
preference label. DPO trains on those pairs against a frozen reference (train.py mode='dpo').
Both stages append one JSON line per prompt and flush it, so an interrupted run resumes where it stopped.

The chat template is plain text, the same on every tokenizer:

    Human: {prompt}

    Assistant: {response}
    END

and a conversation is such turns joined by a blank line. Plain-text markers rather than special token ids, because
(1) the character-level vocabulary of data/shakespeare_char has no spare ids: its 65 ids are its 65 characters, and
every character of the markers is among them; (2) a new id would start with an untrained embedding, while text
markers reuse what the model knows, and a pretrained GPT-2 has seen plenty of "Name: text" dialogue. The price is
that a text could contain a marker and fake a turn, so encode_chat refuses texts that contain one, and generated
text is cut at the first marker. The end marker END lets the model say it has finished: SFT trains it on the
response tokens including "\\nEND", and generation stops there. On a character-level model a text with a character
outside the vocabulary is an error naming the character.
"""

import argparse
import copy
import difflib
import json
import math
import os
import random
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# constitutions


class ConstitutionError(ValueError):
    pass


PRINCIPLE_FIELDS = {"id": str, "category": str, "critique_request": str, "revision_request": str}
OPTIONAL_FIELDS = {"weight": (int, float), "comparison_question": str}
TOP_FIELDS = {"name": str, "principles": list}


def _type_name(value):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def load_constitution(path):
    """The constitution in a JSON file, checked: every error names the principle, the field and what was expected.
    Returns the parsed dict, with each principle's weight filled in."""
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
        raise ConstitutionError(f"{path}: expected a JSON object with 'name' and 'principles', got {_type_name(c)}")
    _check_fields(c, TOP_FIELDS, {"description": str}, path)
    if not c["name"].strip():
        raise ConstitutionError(f"{path}: 'name' must not be empty")
    if not c["principles"]:
        raise ConstitutionError(f"{path}: 'principles' is an empty list; a constitution needs at least one")
    first_use = {}
    for i, p in enumerate(c["principles"]):
        where = f"{path}: principles[{i}]"
        if not isinstance(p, dict):
            raise ConstitutionError(f"{where}: expected an object, got {_type_name(p)}")
        if isinstance(p.get("id"), str) and p["id"].strip():
            where += f" (id {p['id']!r})"
        _check_fields(p, PRINCIPLE_FIELDS, OPTIONAL_FIELDS, where)
        for key, value in p.items():
            if isinstance(value, str) and not value.strip():
                raise ConstitutionError(f"{where}: field '{key}' is empty; expected some text")
        weight = p.setdefault("weight", 1.0)
        if isinstance(weight, bool) or not (math.isfinite(weight) and weight > 0):
            raise ConstitutionError(f"{where}: field 'weight' must be a positive number, got {weight!r}")
        if p["id"] in first_use:
            raise ConstitutionError(f"{where}: duplicate id {p['id']!r} (already used by "
                                    f"principles[{first_use[p['id']]}])")
        first_use[p["id"]] = i
    return c


def _check_fields(obj, required, optional, where):
    for key in obj:
        if key not in required and key not in optional:
            close = difflib.get_close_matches(key, [*required, *optional], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join([*required, *optional])}"
            raise ConstitutionError(f"{where}: unknown field '{key}'{hint}")
    for key in required:
        if key not in obj:
            raise ConstitutionError(f"{where}: missing field '{key}'")
    for key, kind in {**required, **optional}.items():
        if key in obj and (not isinstance(obj[key], kind) or isinstance(obj[key], bool)):
            expected = {str: "a string", list: "a list"}.get(kind, "a number")
            raise ConstitutionError(f"{where}: field '{key}' must be {expected}, got {_type_name(obj[key])}")


def sample_principle(constitution, rng):
    """One principle, drawn with probability proportional to its weight."""
    principles = constitution["principles"]
    return rng.choices(principles, weights=[p["weight"] for p in principles])[0]


def comparison_question(principle):
    # a principle without its own multiple-choice question is asked through its revision request
    return principle.get("comparison_question") or \
        f"Which of these replies better does what this asks: {principle['revision_request']}"


# -----------------------------------------------------------------------------
# tokenizer and chat template

HUMAN, ASSISTANT, END, TURN_SEP = "Human: ", "\n\nAssistant:", "\nEND", "\n\n"
MARKERS = ("Human:", "Assistant:", END)  # no text may contain these; generated text is cut at the first


class Tokenizer:
    """The tokenizer described by a dataset's meta.json: 'char' (its "chars" string) or a tiktoken encoding."""

    def __init__(self, meta):
        self.name = meta.get("tokenizer", "gpt2")
        if self.name == "char":
            self.chars = meta["chars"]
            self.stoi = {ch: i for i, ch in enumerate(self.chars)}
            self.vocab_size = len(self.chars)
        else:
            import tiktoken
            self.enc = tiktoken.get_encoding(self.name)
            self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        if self.name == "char":
            unknown = sorted({ch for ch in text if ch not in self.stoi})
            if unknown:
                raise ValueError(f"characters outside the {len(self.chars)}-character vocabulary: "
                                 f"{', '.join(map(repr, unknown))}")
            return [self.stoi[ch] for ch in text]
        return self.enc.encode(text, disallowed_special=())  # a literal "<|endoftext|>" is text, not a separator

    def decode(self, ids):
        if self.name == "char":
            return "".join(self.chars[i] for i in ids)
        return self.enc.decode([i for i in ids if i < self.enc.n_vocab])  # padded ids are not text


def chat_context(prompt, history=()):
    """The text the model continues to answer `prompt`, after earlier (human, assistant) turns."""
    past = "".join(f"{HUMAN}{h}{ASSISTANT} {a}{END}{TURN_SEP}" for h, a in history)
    return f"{past}{HUMAN}{prompt}{ASSISTANT}"


def encode_chat(tokenizer, prompt, response=None, history=()):
    """Token ids of a conversation and a parallel list of 0/1, 1 on the tokens of the final response (its text and
    END: what SFT trains and DPO scores). Without a response: the context that generation continues. The two parts
    are encoded separately, so their boundary is exact and is the one generation sees. Surrounding whitespace is
    not part of a text."""
    texts = {"prompt": prompt}
    for i, (h, a) in enumerate(history):
        texts[f"prompt of turn {i + 1}"], texts[f"response of turn {i + 1}"] = h, a
    if response is not None:
        texts["response"] = response
    for what, text in texts.items():
        text = texts[what] = text.strip()
        for marker in MARKERS:
            if marker in text:
                raise ValueError(f"the {what} contains the chat marker {marker!r}, which would fake a turn")
        try:
            tokenizer.encode(text)
        except ValueError as e:
            raise ValueError(f"the {what} has {e}") from None
    history = [(texts[f"prompt of turn {i + 1}"], texts[f"response of turn {i + 1}"]) for i in range(len(history))]
    ids = tokenizer.encode(chat_context(texts["prompt"], history))
    mask = [0] * len(ids)
    if response is not None:
        reply = tokenizer.encode(f" {texts['response']}{END}")
        ids, mask = ids + reply, mask + [1] * len(reply)
    return ids, mask


def clean_reply(text):
    """A generated reply up to its end marker, or up to where it starts a new turn, without surrounding space."""
    cut = min([i for i in (text.find(m) for m in MARKERS) if i >= 0], default=len(text))
    return text[:cut].strip()


# -----------------------------------------------------------------------------
# data: JSONL files, SFT and preference batches


def read_jsonl(path, fields):
    """The records of a JSONL file (blank lines skipped), each an object with string `fields`; errors name the line."""
    records = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {_type_name(r)}")
            for key in fields:
                if not isinstance(r.get(key), str):
                    got = "missing" if key not in r else f"{_type_name(r[key])}, expected a string"
                    raise ValueError(f"{path}:{lineno}: field '{key}' {got}")
            r["_line"] = lineno
            records.append(r)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def sft_examples(path, tokenizer):
    """(ids, mask) of every {"prompt", "response"} line of a JSONL file (other fields are ignored)."""
    out = []
    for r in read_jsonl(path, ("prompt", "response")):
        try:
            out.append(encode_chat(tokenizer, r["prompt"], r["response"]))
        except ValueError as e:
            raise ValueError(f"{path}:{r['_line']}: {e}") from None
    return out


def preference_examples(path, tokenizer):
    """(chosen, rejected, p) of every {"prompt", "chosen", "rejected"[, "p_chosen"]} line, chosen and rejected as
    (ids, mask); p is p_chosen (how sure the labeller was that chosen is better), 1 when absent."""
    out = []
    for r in read_jsonl(path, ("prompt", "chosen", "rejected")):
        p = r.get("p_chosen", 1.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{path}:{r['_line']}: p_chosen must be a number from 0 to 1, got {p!r}")
        try:
            out.append((encode_chat(tokenizer, r["prompt"], r["chosen"]),
                        encode_chat(tokenizer, r["prompt"], r["rejected"]), float(p)))
        except ValueError as e:
            raise ValueError(f"{path}:{r['_line']}: {e}") from None
    return out


def finetune_data(mode, train_path, val_path, tokenizer):
    """{'train': examples, 'val': examples} for train.py's mode 'sft' (sft_examples) or 'dpo' (preference_examples).
    Without a validation file every tenth line of the training file is held out."""
    if mode not in ("sft", "dpo"):
        raise ValueError(f"mode must be 'pretrain', 'sft' or 'dpo', got {mode!r}")
    what = '{"prompt", "response"}' if mode == "sft" else '{"prompt", "chosen", "rejected"[, "p_chosen"]}'
    if not train_path:
        raise ValueError(f"mode='{mode}' needs train_jsonl=<a JSONL file of {what} lines>")
    load = sft_examples if mode == "sft" else preference_examples
    train = load(train_path, tokenizer)
    if val_path:
        return {"train": train, "val": load(val_path, tokenizer)}
    if len(train) < 10:
        raise ValueError(f"{train_path} has {len(train)} examples, too few to hold out every tenth; give val_jsonl")
    return {"train": [e for i, e in enumerate(train) if i % 10 != 9], "val": train[9::10]}


def pad_batch(seqs, block_size):
    """Inputs and targets (B, T) for (ids, mask) sequences. A target is the next token where that token belongs to a
    response and -1 elsewhere (prompt and padding), which the model's cross-entropy ignores. A sequence longer than
    block_size+1 keeps its last block_size+1 tokens: the end of the response, with END, is what must be learned.
    Padding goes on the right, where causal attention keeps it out of every real position."""
    seqs = [(ids[-(block_size + 1):], mask[-(block_size + 1):]) for ids, mask in seqs]
    T = max(len(ids) for ids, _ in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(seqs):
        ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        x[row, :len(ids) - 1] = ids[:-1]
        y[row, :len(ids) - 1] = ids[1:].masked_fill(~mask[1:], -1)
    return x, y


def draw(n, batch_size, generator, rank=0, world=1):
    """batch_size random indices below n for data-parallel rank `rank` of `world`: every rank draws the same
    world*batch_size from the same generator and keeps its own slice, so a step sees the same examples in every
    layout. The slice is of examples, not of tensor rows (a preference batch has two rows per example)."""
    ix = torch.randint(n, (world * batch_size,), generator=generator)
    return ix[rank * batch_size:(rank + 1) * batch_size].tolist()


def sft_batch(examples, batch_size, block_size, generator, rank=0, world=1):
    """A random batch (X, Y) of SFT examples, the loss masked to response tokens."""
    return pad_batch([examples[i] for i in draw(len(examples), batch_size, generator, rank, world)], block_size)


def preference_batch(pairs, batch_size, block_size, generator, rank=0, world=1):
    """A random batch of preference pairs: X, Y (2B, T) with the chosen sequences in rows :B and the rejected ones
    in rows B:, so one forward scores both, and p (B,) the soft labels."""
    ix = draw(len(pairs), batch_size, generator, rank, world)
    x, y = pad_batch([pairs[i][0] for i in ix] + [pairs[i][1] for i in ix], block_size)
    return x, y, torch.tensor([pairs[i][2] for i in ix])


# -----------------------------------------------------------------------------
# the math of DPO


def sequence_logprobs(logits, targets):
    """Sum over each row of log p(target) for the targets that are not -1 (the response tokens): (B,)."""
    logp = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    return logp.view(targets.shape).sum(-1)  # ignored positions contribute 0


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, p=1.0):
    """DPO's loss from summed sequence log-probs, (B,) each, with the probability p that chosen really is better:
        h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
        loss = -(p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)),   the mean over the batch.
    p = 1 is DPO as published; p < 1 is 'conservative DPO', which does not drive the margin to infinity on a pair
    that may be mislabelled: its optimum is beta h = log(p / (1 - p)). p is a number (label smoothing, 1 - epsilon)
    or one per pair (the soft labels of the AI feedback). Also returns the implicit rewards beta (log pi - log ref)
    of chosen and rejected, detached, for logging."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    z = chosen_reward - rejected_reward
    loss = -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z)).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()


def preference_accuracy(margins):
    """Share of pairs whose chosen response has the higher implicit reward; a tie counts half, so a policy equal
    to its reference scores exactly chance (0.5)."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean()


def dpo_forward(model, ref_model, x, y, p, beta, soft_labels=True):
    """DPO loss of a preference_batch, and statistics: accuracy, reward margin, chosen and rejected rewards."""
    B = p.numel()
    policy = sequence_logprobs(model(x)[0], y)
    with torch.no_grad():
        ref = sequence_logprobs(ref_model(x)[0], y)
    loss, chosen, rejected = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta, p if soft_labels else 1.0)
    margin = chosen - rejected
    return loss, {"accuracy": preference_accuracy(margin), "margin": margin.mean(),
                  "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}


def reference_model(source, device):
    """DPO's frozen reference: the model in source/ckpt.pt when source is a directory, else a copy of the model."""
    ref = load_checkpoint_model(source) if isinstance(source, str) else copy.deepcopy(source)
    ref.requires_grad_(False)
    return ref.eval().to(device)


# -----------------------------------------------------------------------------
# models, generation, and the two stages


def load_checkpoint_model(out_dir):
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; train a model first (python train.py ...)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": 0.0, "grad_checkpoint": False}))
    model.load_state_dict(ckpt["model"])
    model.dataset = ckpt["config"]["dataset"]
    return model.eval()


def load_model(out_dir, device="cpu"):
    """The model in out_dir/ckpt.pt and its tokenizer, from data/<dataset>/meta.json under the working directory
    (as sample.py finds it); without one, GPT-2's tokenizer, as train.py assumes."""
    model = load_checkpoint_model(out_dir).to(device)
    meta_path = os.path.join("data", model.dataset, "meta.json")
    meta = {"tokenizer": "gpt2"}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    elif model.config.vocab_size < 50257:
        raise FileNotFoundError(f"{meta_path} not found, and a vocabulary of {model.config.vocab_size} is not "
                                f"GPT-2's: run from the directory that holds data/{model.dataset}")
    return model, Tokenizer(meta)


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
        text = tokenizer.decode(new)
        if any(m in text for m in MARKERS):
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
    """Opens `path` for appending and returns (file, indices of the prompts already done). A record is complete
    once its line ends in a newline, which is written together with it: a last line without one, or one that does
    not parse, is what a crash mid-write leaves, and is cut off so that its prompt is done again. Anything else
    that is wrong (a bad line before the last, a duplicate, a record of another prompt) is an error, not
    something to repair silently."""
    done, keep = set(), 0
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
        for lineno, line in enumerate(data.splitlines(keepends=True), 1):
            last = keep + len(line) == len(data)
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline")
                r = json.loads(line)
                i = r["index"]
            except (ValueError, KeyError, TypeError):
                if last:
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
    v = sub.add_parser("validate", help="check a constitution file")
    v.add_argument("file")
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
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
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
    for p in constitution["principles"]:
        fields = ("critique_request", "revision_request") if stage == "revise" else ("comparison_question",)
        for field in fields:
            try:
                tokenizer.encode(p[field] if field != "comparison_question" else comparison_question(p))
            except ValueError as e:
                raise ValueError(f"principle {p['id']!r}, field '{field}': {e}") from None


if __name__ == "__main__":
    main()
