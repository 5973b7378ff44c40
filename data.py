"""The data train.py reads: the tokenizer, token files for pretraining and their batches, and the chat template and
fine-tuning data of mode='sft' and mode='dpo'. A turn is
"Human: {prompt}\\n\\nAssistant: {response}\\nEND", and turns are joined by a blank line. The markers are text, not
special ids (a character vocabulary has none to spare; a pretrained model knows text), so no text may hold one."""

import base64
import functools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch


HUMAN, ASSISTANT, END, TURN_SEP = "Human: ", "\n\nAssistant:", "\nEND", "\n\n"
GPT2_BPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiktoken")  # shipped BPE files
MARKERS = ("Human:", "Assistant:", END)  # no text may contain these; generated text is cut at the first
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
# a trained BPE splits text into pieces by GPT-4's pattern (tiktoken's cl100k_base), then merges bytes inside each
BPE_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
               r"""\s+(?!\S)|\s+""")
FORMATS = {"sft": (("prompt", "response"), '{"prompt", "response"}'),  # each mode's string fields, and its lines
           "dpo": (("prompt", "chosen", "rejected"), '{"prompt", "chosen", "rejected"[, "p_chosen"]}')}


def type_name(value):
    return JSON_TYPES.get(type(value), "a number")


def tokenizer_spec(meta):
    """What a meta.json says of the tokenizer that wrote its ids, alone: what every checkpoint keeps."""
    name = meta.get("tokenizer", "gpt2")
    if name.startswith("hf:"):  # absolute: the run may be loaded from another directory
        name = "hf:" + os.path.abspath(name[3:])
    return {"tokenizer": name, **{k: meta[k] for k in ("chars", "eot_id", "bpe") if k in meta}}


class Tokenizer:
    """The tokenizer described by a dataset's meta.json: 'char' (its "chars" string), 'bpe' (a BPE trained on the
    data, its table in "bpe": train_bpe) or a tiktoken encoding; or 'hf:FOLDER', the tokenizer of a local Hugging
    Face model folder (transformers' AutoTokenizer). `spec` is that description alone, which every checkpoint
    keeps: a run is sampled, served and resumed with its own tokenizer."""

    def __init__(self, meta):
        self.spec = tokenizer_spec(meta)
        self.name = self.spec["tokenizer"]
        if self.name == "char":
            self.chars = meta["chars"]
            self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self._loaded = None  # the tiktoken encoding or HF tokenizer, loaded at first use (a run may start from an
                             # HF folder's weights alone, and pretraining never encodes text)

    @property
    def backend(self):
        if self._loaded is None and self.name.startswith("hf:"):
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ImportError("a Hugging Face tokenizer needs transformers: pip install transformers") from None
            self._loaded = AutoTokenizer.from_pretrained(self.name[3:], local_files_only=True)
        elif self._loaded is None and self.name == "bpe":  # its table travels with the data and every checkpoint
            import tiktoken
            ranks = {base64.b64decode(t): r for r, t in enumerate(self.spec["bpe"]["tokens"])}
            self._loaded = tiktoken.Encoding("bpe", pat_str=self.spec["bpe"]["pattern"], mergeable_ranks=ranks,
                                             special_tokens={"<|endoftext|>": len(ranks)})
        elif self._loaded is None:
            import tiktoken
            if self.name == "gpt2":  # GPT-2's BPE files ship with the code: no download, no network
                os.environ.setdefault("TIKTOKEN_CACHE_DIR", GPT2_BPE_DIR)
            self._loaded = tiktoken.get_encoding(self.name)
        return self._loaded

    @property
    def vocab_size(self):
        if self.name == "char":
            return len(self.chars)
        return len(self.backend) if self.name.startswith("hf:") else self.backend.n_vocab

    def encode(self, text, special=False):
        if self.name.startswith("hf:"):  # special tokens written in the text are text unless special=True
            return self.backend.encode(text, add_special_tokens=False, split_special_tokens=not special)
        if self.name != "char":  # a literal "<|endoftext|>" is text, not a separator, unless special=True
            return self.backend.encode(text, allowed_special={"<|endoftext|>"} if special else set(),
                                       disallowed_special=())
        unknown = ", ".join(map(repr, sorted(set(text) - self.stoi.keys())))
        if unknown:
            raise ValueError(f"characters outside the {len(self.chars)}-character vocabulary: {unknown}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        if self.name == "char":
            return "".join(self.chars[i] for i in ids)
        return self.backend.decode([i for i in ids if i < self.vocab_size])  # padded ids are not text


def bytes_to_unicode():
    """GPT-2's map of the 256 byte values to printable characters, which its vocab.json and merges are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(extra)}


def train_bpe(texts, vocab_size):
    """A byte-level BPE of vocab_size ids, the last one <|endoftext|>, trained on `texts` (an iterable of strings)
    by Hugging Face tokenizers' trainer; returns meta.json's "bpe" entry, tiktoken's form of it: the split pattern
    and each token's bytes (base64) in rank order, the 256 single bytes first, then the merges in the order made."""
    try:
        from tokenizers import Regex, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise ImportError("training a BPE tokenizer needs Hugging Face tokenizers: pip install tokenizers") from None
    if not 257 < vocab_size < 2**31:
        raise ValueError(f"a trained BPE needs more than 257 tokens (256 bytes and the end-of-text), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(BPE_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    merged = sorted((i, bytes(byte_of[c] for c in t)) for t, i in tok.get_vocab().items() if len(t) > 1)
    tokens = [bytes([b]) for b in range(256)] + [t for _, t in merged]
    return {"pattern": BPE_PATTERN, "tokens": [base64.b64encode(t).decode() for t in tokens]}


# -----------------------------------------------------------------------------
# pretraining: data/<dataset>/{train,val}.bin (token ids) and meta.json (vocab_size, dtype, tokenizer)


def read_meta(data_dir):
    """A prepared dataset's meta.json, or {} without one (GPT-2 tokens as uint16, as nanoGPT's openwebtext)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); prepare the data again (data/*/prepare.py)") from None
    if not isinstance(meta, dict) or meta.get("dtype", "uint16") not in ("uint16", "uint32") or \
            not isinstance(meta.get("vocab_size", 1), int) or meta.get("vocab_size", 1) < 1:
        raise ValueError(f"{path} needs a positive int vocab_size and dtype 'uint16' or 'uint32'; prepare the data "
                         f"again (data/*/prepare.py)")
    return meta


def padded_vocab(meta, mode):
    """A fresh model's vocabulary: the data's (its tokenizer's for sft/dpo, else GPT-2's 50304), padded to a
    multiple of 64, which makes the head's matmul faster (tiny vocabularies stay as they are)."""
    vocab = meta.get("vocab_size") or (Tokenizer(meta).vocab_size if mode != "pretrain" else 50304)
    return 64 * math.ceil(vocab / 64) if vocab > 4096 else vocab


def token_files(data_dir, split):
    """A split's token files: data_dir/split.bin, or else its shards split_000000.bin, split_000001.bin, ... in order
    (data/fineweb/prepare.py writes those)."""
    single = os.path.join(data_dir, f"{split}.bin")
    names = os.listdir(data_dir) if os.path.isdir(data_dir) and not os.path.exists(single) else []
    shards = sorted(n for n in names if re.fullmatch(rf"{split}_\d+\.bin", n))
    return [os.path.join(data_dir, n) for n in shards] or [single]


def check_token_files(data_dir, splits, dtype, block_size, vocab_size=None):
    """{split: its token files} (token_files); ValueError, saying how to fix it, unless each file holds a whole
    number of tokens, each shard the count meta.json lists for it, a split more than a block of them in a file, and
    (the first ~128M tokens of a split are scanned, a second or so; the rest batch by batch) none past vocab_size."""
    files, listed, dtype = {}, read_meta(data_dir).get("shards"), np.dtype(dtype)
    for split in splits:
        files[split] = paths = token_files(data_dir, split)
        if paths[0].endswith(f"{split}.bin"):
            check_token_file(paths[0], dtype, block_size, vocab_size)
            continue
        if not isinstance(listed, dict):
            raise ValueError(f"{data_dir} holds {split} shards but its meta.json lists none: their prepare has not "
                             f"finished; run it again (it continues where it stopped)")
        missing = sorted(set(n for n in listed if n.startswith(f"{split}_")) - {os.path.basename(p) for p in paths})
        if missing:
            raise ValueError(f"{os.path.join(data_dir, missing[0])} is missing (meta.json lists it); copy it again "
                             f"or run the prepare again")
        budget = 2**27 if vocab_size else 0  # tokens scanned for ids past vocab_size
        for path in paths:
            name, n = os.path.basename(path), os.path.getsize(path) / dtype.itemsize
            if name not in listed:
                raise ValueError(f"{path} is not among meta.json's shards: another prepare's shard? Remove it, or "
                                 f"prepare {data_dir} again")
            if n != listed[name]:
                raise ValueError(f"{path} holds {n:,.1f} {dtype.name} tokens where meta.json lists {listed[name]:,}: "
                                 f"truncated (an interrupted copy?) or from another prepare; copy it or prepare again")
            if 0 < n <= budget:
                check_token_range(np.memmap(path, dtype=dtype, mode="r"), vocab_size, path)
                budget -= n
        if max(listed[os.path.basename(p)] for p in paths) <= block_size:
            more = "--val_tokens" if split == "val" else "--shard_tokens"
            raise ValueError(f"no {split} shard of {data_dir} holds more than block_size={block_size} tokens; "
                             f"prepare it with more {more} or use a smaller block_size")
    return files


def check_token_file(path, dtype, block_size, vocab_size=None):
    if not os.path.exists(path):
        data_dir = os.path.dirname(path)
        script = os.path.join(data_dir, "prepare.py")
        how = f"python {script}" if os.path.exists(script) else \
            f"python data/text/prepare.py --out_dir {data_dir} YOUR_TEXT_FILES"
        raise ValueError(f"{path} not found; prepare the data first: {how}")
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise ValueError(f"{path} is {size:,} bytes, not a whole number of {dtype.name} tokens (meta.json's dtype): "
                         f"truncated, or another dtype; prepare the data again")
    if size // dtype.itemsize <= block_size:
        fix = "prepare it with a larger --val_fraction (data/text/prepare.py) or " if path.endswith("val.bin") else \
            "use more text or "
        raise ValueError(f"{path} holds fewer than block_size+1={block_size + 1} tokens; {fix}a smaller block_size")
    if vocab_size and size // dtype.itemsize <= 2**27:
        check_token_range(np.memmap(path, dtype=dtype, mode="r"), vocab_size, path)


def check_token_range(tokens, vocab_size, path):
    if tokens.size and tokens.max() >= vocab_size:
        raise ValueError(f"token id {tokens.max()} in {os.path.basename(path)} is out of range for vocab_size="
                         f"{vocab_size}; was {os.path.dirname(path)} prepared with another tokenizer?")


@functools.lru_cache(maxsize=16)
def token_counts(paths, itemsize):
    """Tokens in each file, read once: a run's token files do not change under it (train.py checked them)."""
    return np.array([os.path.getsize(p) // itemsize for p in paths])


def read_tokens(path, dtype, start, n):
    return np.fromfile(path, dtype=dtype, count=n, offset=start * dtype.itemsize)


def pretrain_batch(paths, dtype, batch_size, block_size, generator, rank=0, world=1, vocab_size=None):
    """X, Y (B, T) of random windows of a token file, or of a list of them (shards: a window lies in one shard, each
    possible window equally likely), for data-parallel rank `rank` of `world` (all draw the same world*batch_size
    windows, each keeps its slice). Ids past vocab_size are a ValueError. A mask file beside a token file
    (train.bin: train_mask.bin, one uint8 a token, 1 at the tokens to learn) sets Y to -1 (no loss) elsewhere."""
    paths, dtype = [paths] if isinstance(paths, str) else list(paths), np.dtype(dtype)
    counts = token_counts(tuple(paths), dtype.itemsize)
    windows = np.maximum(0, counts - block_size)  # window starts in each file
    ends = np.cumsum(windows)
    ix = torch.randint(int(ends[-1]), (world * batch_size,), generator=generator)  # one file: as nanoGPT draws
    drawn = ix[rank * batch_size:(rank + 1) * batch_size].numpy()
    which = np.searchsorted(ends, drawn, side="right")  # each window's file, and its start there
    starts = (drawn - ends[which] + windows[which]).tolist()
    tokens = np.stack([read_tokens(paths[f], dtype, i, block_size + 1) for f, i in zip(which, starts)])
    tokens = tokens.astype(np.int64)
    if vocab_size and tokens.max() >= vocab_size:  # cheap per batch, catches what train.py's startup scan skipped
        row = int(np.argmax(tokens.max(axis=1) >= vocab_size))
        check_token_range(tokens[row], vocab_size, paths[which[row]])
    x, y = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:].copy())  # (y is masked in place)
    for f in np.unique(which):
        mask_path = paths[f][:-len(".bin")] + "_mask.bin"
        if os.path.exists(mask_path):
            if os.path.getsize(mask_path) != counts[f]:
                raise ValueError(f"{mask_path} has {os.path.getsize(mask_path)} entries for {counts[f]} tokens in "
                                 f"{paths[f]}; write both again")
            rows = np.flatnonzero(which == f)
            mask = np.stack([read_tokens(mask_path, np.dtype(np.uint8), starts[r] + 1, block_size) for r in rows])
            y[rows] = y[rows].masked_fill(torch.from_numpy(mask) == 0, -1)
    return x, y


# -----------------------------------------------------------------------------
# fine-tuning: the chat template and JSONL examples


def _checked(tokenizer, what, text):
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
    """Token ids and a mask, 1 on the response and its END (without a response: the context to generate from). The
    response is encoded apart from the context, so the boundary between them is the one generation sees."""
    prompt = _checked(tokenizer, "prompt", prompt)
    history = [(_checked(tokenizer, f"prompt of turn {i}", h), _checked(tokenizer, f"response of turn {i}", a))
               for i, (h, a) in enumerate(history, 1)]
    past = "".join(f"{HUMAN}{h}{ASSISTANT} {a}{END}{TURN_SEP}" for h, a in history)
    ids = tokenizer.encode(f"{past}{HUMAN}{prompt}{ASSISTANT}")
    reply = [] if response is None else tokenizer.encode(f" {_checked(tokenizer, 'response', response)}{END}")
    return ids + reply, [0] * len(ids) + [1] * len(reply)


def clean_reply(text):
    """A generated reply up to its end marker, or up to where it starts a new turn, without surrounding space."""
    cut = min([i for i in (text.find(m) for m in MARKERS) if i >= 0], default=len(text))
    return text[:cut].strip()


def partial_reply(text):
    """The start of a reply still being generated that clean_reply will keep whatever follows (serve.py streams it):
    it holds back a tail that may begin a marker, trailing space and a half-decoded UTF-8 character (U+FFFD)."""
    if any(m in text for m in MARKERS):
        return clean_reply(text)
    for n in range(min(len(text), max(map(len, MARKERS))), 0, -1):
        if any(m.startswith(text[-n:]) for m in MARKERS):
            text = text[:-n]
            break
    return text.rstrip("\ufffd").strip()


def read_jsonl(path, fields):
    """(line number, record) of each JSONL line, all checked before any is used: objects with string `fields`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    records = []
    for lineno, line in enumerate(lines, 1):
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
    return records


def load_examples(path, tokenizer, mode):
    """(ids, mask) per line for 'sft'; (chosen, rejected, p_chosen: how sure the labeller was, default 1) for 'dpo'."""
    examples = []
    for lineno, r in read_jsonl(path, FORMATS[mode][0]):
        p = r.get("p_chosen", 1.0)
        try:
            if mode == "dpo" and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1):
                raise ValueError(f"p_chosen must be a number from 0 to 1, got {p!r}")
            replies = [encode_chat(tokenizer, r["prompt"], r[k]) for k in FORMATS[mode][0][1:]]  # after "prompt"
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        examples.append(replies[0] if mode == "sft" else (*replies, float(p)))
    return examples


def finetune_data(mode, train_path, val_path, tokenizer):
    """{'train': examples, 'val': examples}; without a validation file every tenth training line is held out."""
    if mode not in FORMATS:
        raise ValueError(f"mode must be 'pretrain', 'sft' or 'dpo', got {mode!r}")
    if not train_path:
        raise ValueError(f"mode='{mode}' needs train_jsonl=<a JSONL file of {FORMATS[mode][1]} lines>")
    train = load_examples(train_path, tokenizer, mode)
    if val_path:
        return {"train": train, "val": load_examples(val_path, tokenizer, mode)}
    if len(train) < 10:
        raise ValueError(f"{train_path} has {len(train)} examples, too few to hold out every tenth; give val_jsonl")
    return {"train": [e for i, e in enumerate(train) if i % 10 != 9], "val": train[9::10]}


def pad_batch(seqs, block_size):
    """X, Y (B, T), Y -1 (ignored) outside responses; long sequences keep their end (END), padding goes on the right."""
    seqs = [(ids[-(block_size + 1):], mask[-(block_size + 1):]) for ids, mask in seqs]
    n = max(len(ids) for ids, _ in seqs)  # T + 1
    x = [ids[:-1] + [0] * (n - len(ids)) for ids, _ in seqs]
    y = [[t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (n - len(ids)) for ids, mask in seqs]
    return torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)


def finetune_batch(examples, batch_size, block_size, generator, rank=0, world=1):
    """Random examples for data-parallel rank `rank` of `world` (all draw the same world*batch_size, each keeps its
    slice): X, Y of SFT examples, or X, Y (2B, T) of pairs, chosen rows then rejected rows, with their p (B,)."""
    ix = torch.randint(len(examples), (world * batch_size,), generator=generator)
    drawn = [examples[i] for i in ix[rank * batch_size:(rank + 1) * batch_size].tolist()]
    if len(drawn[0]) == 2:
        return pad_batch(drawn, block_size)
    chosen, rejected, p = zip(*drawn)
    return (*pad_batch(chosen + rejected, block_size), torch.tensor(p))
