"""
Tokenizes your own text, with a tiktoken encoding, by characters or with a BPE trained on it, for
`python train.py --dataset=<name>`.

    python data/text/prepare.py notes.txt books/ web.jsonl --out_dir data/mycorpus
    python data/text/prepare.py corpus/       # writes to data/text/: train with --dataset=text
    python data/text/prepare.py poems/ --tokenizer=char --val_fraction=0.1 --out_dir data/poems
    python data/text/prepare.py books/ --tokenizer=bpe:4096 --out_dir data/books   # a 4096-token BPE of its own

Inputs, in the order given: folders (their .txt and .md files, recursively in sorted order, hidden ones skipped),
.jsonl files (a string "text" field per line) and other files (UTF-8 text, line endings normalised to \\n). Each
file or JSONL line is a document; empty ones are skipped, the others separated by the end-of-text token (a literal
"<|endoftext|>" in the text is ordinary text; --tokenizer=char has none: documents follow each other). val.bin gets
the last documents making up about --val_fraction of the tokens (half to twice that), or failing a document boundary
in that range, the last --val_fraction of the tokens; train.py needs more than block_size tokens in each file.
Writes train.bin / val.bin (uint16 for vocabularies under 65536 ids, else uint32) and meta.json to --out_dir.
--tokenizer=bpe:N trains a byte-level BPE of N tokens (data.train_bpe: Hugging Face tokenizers) on the text before
the last --val_fraction of its characters; its table goes into meta.json, and from there into every checkpoint.
"""

import argparse
import json
import os
import sys
import time
from array import array

import numpy as np
import tiktoken

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", ".."))  # the repository: data.py
import data  # noqa: E402
PIECE_CHARS = 1 << 20   # characters read from a text file at a time
BATCH_CHARS = 1 << 22   # characters tokenized together (tiktoken spreads a batch over threads)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("inputs", nargs="+", metavar="PATH", help=".txt/.md files, folders or .jsonl files")
parser.add_argument("--out_dir", default=here, help="where train.bin, val.bin and meta.json go (default: %(default)s)")
parser.add_argument("--tokenizer", default="gpt2", help="a tiktoken encoding name, 'char': each distinct character "
                                                         "of the inputs one token, or bpe:N, a byte-level BPE of N "
                                                         "tokens trained on the inputs (default: %(default)s)")
parser.add_argument("--val_fraction", type=float, default=0.01,
                    help="share of the tokens for val.bin (default: %(default)s)")
args = parser.parse_args()
if not 0 < args.val_fraction < 1:
    raise SystemExit(f"error: --val_fraction must be between 0 and 1, got {args.val_fraction}")
if os.path.isfile(args.out_dir):
    raise SystemExit(f"error: --out_dir {args.out_dir} is a file; give a directory for train.bin, val.bin, meta.json")

# find every file before tokenizing anything: a typo in the last path should not cost an hour of work
sources = []
for path in args.inputs:
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist")
    found = [] if os.path.isdir(path) else [path]
    for root, dirs, files in os.walk(path):  # nothing for a file
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if f.endswith((".txt", ".md")) and not f.startswith(".")]
    if not found:
        print(f"warning: no .txt or .md files under {path}; files of other names are read when named: "
              f"{os.path.join(path, '*')}", file=sys.stderr)
    sources += sorted(found)


def text_pieces(path):
    """A text file in pieces of about PIECE_CHARS, cut just after a '\\n' between a non-space and a letter or digit,
    where tiktoken's split patterns (gpt2 to o200k) always end a pre-token: the pieces' tokens are the whole file's."""
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not text
        carry = ""
        while block := f.read(PIECE_CHARS):
            text = carry + block
            start, end = max(1, len(carry) - 1), len(text) - 1  # the carried part was searched already
            while (i := text.rfind("\n", start, end)) != -1 and (text[i - 1].isspace() or not text[i + 1].isalnum()):
                end = i
            if i != -1:
                yield text[:i + 1]
            carry = text[i + 1:]  # all of it when there is no cut (i == -1)
        if carry:
            yield carry


def documents():
    """(text, starts_a_document) pieces of every non-empty document, in order."""
    for path in sources:
        try:
            if not path.endswith(".jsonl"):  # a folder's files are all .txt or .md
                yield from ((piece, i == 0) for i, piece in enumerate(text_pieces(path)))
                continue
            with open(path, encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"error: {path}, line {lineno}:"
                    try:
                        text = json.loads(line)["text"]
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{where} not valid JSON ({e.msg} at column {e.pos + 1})")
                    except (KeyError, TypeError):
                        raise SystemExit(f'{where} no "text" field')
                    if not isinstance(text, str):
                        raise SystemExit(f'{where} "text" must be a string, got {type(text).__name__}')
                    if text:
                        yield text, True
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: {path} is not UTF-8 text ({e.reason}); convert it (iconv -f LATIN1 -t UTF-8 "
                             f"{path} > converted.txt, with its real encoding) or leave it out")


class CharEncoding:
    """The few parts of tiktoken's Encoding used below, for a vocabulary of the given characters (sorted)."""
    eot_token = None  # documents are simply concatenated

    def __init__(self, chars):
        self.chars = "".join(sorted(chars))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.n_vocab = len(self.chars)

    def encode_ordinary_batch(self, texts):
        return [[self.stoi[ch] for ch in text] for text in texts]


def trained_bpe(n):
    """A BPE of n tokens (tiktoken's Encoding) trained on the text before the last val_fraction of characters."""
    total = sum(len(text) for text, _ in documents())
    if total == 0:
        raise SystemExit(f"error: no text found in {' '.join(args.inputs)}")

    def head():
        seen = 0
        for text, _ in documents():
            if seen >= (1 - args.val_fraction) * total:
                return
            yield text[:int((1 - args.val_fraction) * total - seen) + 1]
            seen += len(text)
    t0 = time.time()
    bpe = data.train_bpe(head(), n)
    print(f"trained a BPE of {len(bpe['tokens']) + 1} tokens in {time.time() - t0:.1f} s", file=sys.stderr)
    return data.Tokenizer({"tokenizer": "bpe", "bpe": bpe, "eot_id": len(bpe["tokens"])})


if args.tokenizer == "gpt2":  # GPT-2's BPE files ship in data/tiktoken: no network needed
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(here, "..", "tiktoken"))
trained = None
try:
    if args.tokenizer.startswith("bpe:"):
        if not args.tokenizer[4:].isdigit():
            raise SystemExit(f"error: --tokenizer={args.tokenizer}: write bpe:N with N the vocabulary size, e.g. "
                             f"bpe:4096")
        trained = trained_bpe(int(args.tokenizer[4:]))
    # the character vocabulary is every character of the inputs: one pass over them to collect it
    enc = CharEncoding({ch for text, _ in documents() for ch in text}) if args.tokenizer == "char" else \
        trained.backend if trained else tiktoken.get_encoding(args.tokenizer)
except ImportError as e:
    raise SystemExit(f"error: --tokenizer={args.tokenizer}: {e}")
except ValueError as e:
    if trained is None and args.tokenizer.startswith("bpe:"):
        raise SystemExit(f"error: --tokenizer={args.tokenizer}: {e}")
    raise SystemExit(f"error: unknown tokenizer {args.tokenizer!r}; "
                     f"tiktoken has {', '.join(tiktoken.list_encoding_names())}")
except Exception as e:  # tiktoken downloads the encoding on first use
    raise SystemExit(f"error: could not load tokenizer {args.tokenizer!r} ({type(e).__name__}); offline, set "
                     f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files")
dtype = np.dtype(np.uint16 if enc.n_vocab < 65536 else np.uint32)
os.makedirs(args.out_dir, exist_ok=True)
train_path, val_path = os.path.join(args.out_dir, "train.bin"), os.path.join(args.out_dir, "val.bin")
# everything goes to train.bin.tmp; val.bin is its tail, moved out once the total is known. The .tmp names keep a
# failed or interrupted run from leaving files that look like a finished dataset.
tmp_train, tmp_val = train_path + ".tmp", val_path + ".tmp"
doc_starts = array("q")  # token offset of each document after the first: the candidate split points
n_tokens, t0 = 0, time.time()


def batches():
    """documents() in lists of about BATCH_CHARS characters."""
    batch, chars = [], 0
    for text, starts in documents():
        batch.append((text, starts))
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


try:
    with open(tmp_train, "wb") as out:
        for batch in batches():
            ids = []
            for (_, starts), tokens in zip(batch, enc.encode_ordinary_batch([text for text, _ in batch])):
                if starts and (n_tokens or ids):  # an end-of-text before each document but the first
                    if enc.eot_token is not None:
                        ids.append(enc.eot_token)
                    doc_starts.append(n_tokens + len(ids))
                ids += tokens
            np.array(ids, dtype=dtype).tofile(out)
            n_tokens += len(ids)
            if sys.stderr.isatty():  # progress on a terminal; a log gets the summary line alone
                print(f"\r{len(doc_starts) + 1:,} documents, {n_tokens:,} tokens, {time.time() - t0:.0f} s", end="",
                      file=sys.stderr)
    if n_tokens == 0:
        raise SystemExit(f"error: no text found in {' '.join(args.inputs)} (in a folder only .txt and .md files are "
                         f"read; name other files to read them, e.g. FOLDER/*)")
    if n_tokens < 2:
        raise SystemExit("error: the input is a single token; train.bin and val.bin need at least one each")

    want = min(max(1, round(args.val_fraction * n_tokens)), n_tokens - 1)  # neither file empty
    split, how = n_tokens - want, "inside a document"
    # the document boundary nearest the wanted split, if it gives val between half and twice its share
    best = min(doc_starts, key=lambda s: abs(s - split), default=None)
    if best is not None and want / 2 <= n_tokens - best <= 2 * want:
        split, how = best, "at a document boundary"

    np.memmap(tmp_train, dtype, "r", offset=split * dtype.itemsize).tofile(tmp_val)  # the tail, via a memory map
    os.truncate(tmp_train, split * dtype.itemsize)
    os.replace(tmp_train, train_path)
    os.replace(tmp_val, val_path)
finally:
    if n_tokens and sys.stderr.isatty():
        print(file=sys.stderr)  # end the progress line, before any error message
    for path in (tmp_train, tmp_val):
        if os.path.exists(path):
            os.remove(path)

with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
    meta = dict(vocab_size=enc.n_vocab, dtype=dtype.name, tokenizer=args.tokenizer, eot_id=enc.eot_token)
    json.dump({**meta, "chars": enc.chars} if args.tokenizer == "char" else trained.spec | meta | {"tokenizer": "bpe"}
              if trained else meta, f)
print(f"{len(doc_starts) + 1:,} documents, {n_tokens:,} tokens ({args.tokenizer}, vocab {enc.n_vocab}, {dtype.name}): "
      f"train {split:,} tokens, val {n_tokens - split:,} tokens, split {how}; written to {args.out_dir}")
