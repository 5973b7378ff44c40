"""
The chat template, fine-tuning data and DPO loss that train.py uses for mode='sft' and mode='dpo'.

A turn is "Human: {prompt}\\n\\nAssistant: {response}\\nEND", and a conversation is turns joined by a blank line.
The markers are plain text, not special token ids: a character-level vocabulary has no spare ids, and text markers
reuse what a pretrained model knows instead of starting from an untrained embedding. So no text may contain one.
"""

import copy
import json

import torch
import torch.nn.functional as F

from model import load_run

HUMAN, ASSISTANT, END, TURN_SEP = "Human: ", "\n\nAssistant:", "\nEND", "\n\n"
MARKERS = ("Human:", "Assistant:", END)  # no text may contain these; generated text is cut at the first
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}


def type_name(value):
    """How an error message names the type of a JSON value."""
    return JSON_TYPES.get(type(value), "a number")


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


# -----------------------------------------------------------------------------
# the chat template


def chat_context(prompt, history=()):
    """The text the model continues to answer `prompt`, after earlier (human, assistant) turns."""
    past = "".join(f"{HUMAN}{h}{ASSISTANT} {a}{END}{TURN_SEP}" for h, a in history)
    return f"{past}{HUMAN}{prompt}{ASSISTANT}"


def _checked(tokenizer, what, text):
    """`text` stripped; an error if it holds a marker or a token the tokenizer lacks."""
    text = text.strip()
    for marker in MARKERS:
        if marker in text:
            raise ValueError(f"the {what} contains the chat marker {marker!r}, which would fake a turn")
    try:
        tokenizer.encode(text)
    except ValueError as e:
        raise ValueError(f"the {what} has {e}") from None
    return text


def encode_chat(tokenizer, prompt, response=None, history=()):
    """Token ids of a conversation and a parallel list of 0/1, 1 on the tokens of the final response (its text and
    END: what SFT trains and DPO scores). Without a response: the context that generation continues. The two parts
    are encoded separately, so their boundary is exact and is the one generation sees. Surrounding whitespace is
    not part of a text."""
    prompt = _checked(tokenizer, "prompt", prompt)
    history = [(_checked(tokenizer, f"prompt of turn {i}", h), _checked(tokenizer, f"response of turn {i}", a))
               for i, (h, a) in enumerate(history, 1)]
    if response is not None:
        response = _checked(tokenizer, "response", response)
    ids = tokenizer.encode(chat_context(prompt, history))
    mask = [0] * len(ids)
    if response is not None:
        reply = tokenizer.encode(f" {response}{END}")
        ids, mask = ids + reply, mask + [1] * len(reply)
    return ids, mask


def clean_reply(text):
    """A generated reply up to its end marker, or up to where it starts a new turn, without surrounding space."""
    cut = min([i for i in (text.find(m) for m in MARKERS) if i >= 0], default=len(text))
    return text[:cut].strip()


# -----------------------------------------------------------------------------
# data: JSONL files, SFT and preference batches


def read_jsonl(path, fields, convert=lambda r: r):
    """convert(record) of every record of a JSONL file (blank lines skipped), each an object with string `fields`.
    Errors, convert's ValueErrors included, name the line."""
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
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type_name(r)}")
            for key in fields:
                if not isinstance(r.get(key), str):
                    got = "missing" if key not in r else f"{type_name(r[key])}, expected a string"
                    raise ValueError(f"{path}:{lineno}: field '{key}' {got}")
            records.append((lineno, r))
    if not records:
        raise ValueError(f"{path}: no records")
    out = []
    for lineno, r in records:  # after the whole file is read: a malformed line is reported first
        try:
            out.append(convert(r))
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
    return out


def sft_examples(path, tokenizer):
    """(ids, mask) of every {"prompt", "response"} line of a JSONL file (other fields are ignored)."""
    return read_jsonl(path, ("prompt", "response"), lambda r: encode_chat(tokenizer, r["prompt"], r["response"]))


def preference_examples(path, tokenizer):
    """(chosen, rejected, p) of every {"prompt", "chosen", "rejected"[, "p_chosen"]} line, chosen and rejected as
    (ids, mask); p is p_chosen (how sure the labeller was that chosen is better), 1 when absent."""
    def pair(r):
        p = r.get("p_chosen", 1.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"p_chosen must be a number from 0 to 1, got {p!r}")
        chosen, rejected = (encode_chat(tokenizer, r["prompt"], r[k]) for k in ("chosen", "rejected"))
        return chosen, rejected, float(p)

    return read_jsonl(path, ("prompt", "chosen", "rejected"), pair)


FORMATS = {"sft": (sft_examples, '{"prompt", "response"}'),
           "dpo": (preference_examples, '{"prompt", "chosen", "rejected"[, "p_chosen"]}')}


def finetune_data(mode, train_path, val_path, tokenizer):
    """{'train': examples, 'val': examples} for train.py's mode 'sft' (sft_examples) or 'dpo' (preference_examples).
    Without a validation file every tenth line of the training file is held out."""
    if mode not in FORMATS:
        raise ValueError(f"mode must be 'pretrain', 'sft' or 'dpo', got {mode!r}")
    load, what = FORMATS[mode]
    if not train_path:
        raise ValueError(f"mode='{mode}' needs train_jsonl=<a JSONL file of {what} lines>")
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


def describe(stats):
    """The log line of dpo_forward's statistics, given as floats."""
    return (f"dpo: accuracy {stats['accuracy']:.3f}, reward margin {stats['margin']:.4f}, "
            f"chosen {stats['chosen_reward']:.4f}, rejected {stats['rejected_reward']:.4f}")


def reference_model(source, device):
    """DPO's frozen reference: the model in source/ckpt.pt when source is a directory, else a copy of the model."""
    ref = load_run(source)[0] if isinstance(source, str) else copy.deepcopy(source)
    ref.requires_grad_(False)
    return ref.eval().to(device)
