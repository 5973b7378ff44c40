"""
Tokenizes your own text with a tiktoken encoding, for `python train.py --dataset=<name>`.

    python data/text/prepare.py notes.txt books/ web.jsonl --out_dir data/mycorpus
    python train.py --dataset=mycorpus ...
    python data/text/prepare.py corpus/       # writes to data/text/: train with --dataset=text

Inputs, read in the order given:
  - a folder: every .txt and .md file under it (recursively, in sorted order; hidden files and folders skipped),
    each file one document
  - a .jsonl file: one JSON object per line with a string "text" field, each line one document (blank lines skipped)
  - any other file: plain UTF-8 text, one document
Line endings in text files are normalised to \\n. Empty documents are skipped. Documents are separated by the
tokenizer's end-of-text token (one between each two documents, none at the ends); a literal "<|endoftext|>" inside
the text is tokenized as ordinary text, never as the separator.

The split is by documents: val.bin gets the last documents, as many as make up about --val_fraction of the tokens
(between half and twice that). When no document boundary falls in that range (a single document, or a few large
ones) the last --val_fraction of the tokens go to val.bin, cut inside a document. Either way val.bin holds at
least one token, and train.bin followed by val.bin is exactly the token stream. For a corpus of GBs 0.0005 leaves
plenty of validation tokens; keep in mind that train.py needs more than block_size tokens in each file.

Writes train.bin / val.bin (uint16 when the vocabulary has fewer than 65536 ids, else uint32) and meta.json to
--out_dir. Tokens are streamed to disk as they come; large text files are read in pieces cut at line breaks where
the tokenizer never merges across (so the tokens are those of the whole file), which keeps memory small.
"""

import argparse
import bisect
import json
import os
import sys
import time
from array import array

import numpy as np
import tiktoken

here = os.path.dirname(os.path.abspath(__file__))
PIECE_CHARS = 1 << 20   # characters read from a text file at a time
BATCH_CHARS = 1 << 22   # characters tokenized together (tiktoken spreads a batch over threads)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("inputs", nargs="+", metavar="PATH", help=".txt/.md files, folders or .jsonl files")
parser.add_argument("--out_dir", default=here, help="where train.bin, val.bin and meta.json go (default: %(default)s)")
parser.add_argument("--tokenizer", default="gpt2", help="a tiktoken encoding name (default: %(default)s)")
parser.add_argument("--val_fraction", type=float, default=0.01,
                    help="share of the tokens for val.bin (default: %(default)s)")
args = parser.parse_args()
if not 0 < args.val_fraction < 1:
    raise SystemExit(f"error: --val_fraction must be between 0 and 1, got {args.val_fraction}")

# find every file before tokenizing anything: a typo in the last path should not cost an hour of work
sources = []  # (kind, path)
for path in args.inputs:
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist")
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.join(root, f) for f in files
                      if f.endswith((".txt", ".md")) and not f.startswith(".")]
        if not found:
            print(f"warning: no .txt or .md files under {path}", file=sys.stderr)
        sources += [("text", f) for f in sorted(found)]
    else:
        sources.append(("jsonl" if path.endswith(".jsonl") else "text", path))


def text_pieces(path):
    """The text of a file in pieces of about PIECE_CHARS. A piece ends only just after a '\\n' that follows a
    non-space character and precedes a letter or digit: the split patterns of tiktoken's encodings (gpt2 to o200k)
    always end a pre-token there, so tokenizing the pieces one by one gives the tokens of the whole file. A file
    without such a line break is read whole."""
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not text
        carry = ""
        while block := f.read(PIECE_CHARS):
            text = carry + block
            cut, end = None, len(text) - 1
            start = max(1, len(carry) - 1)  # the carried part was searched already
            while (i := text.rfind("\n", start, end)) != -1:
                if not text[i - 1].isspace() and text[i + 1].isalnum():
                    cut = i + 1
                    break
                end = i
            if cut is None:
                carry = text
            else:
                yield text[:cut]
                carry = text[cut:]
        if carry:
            yield carry


def documents():
    """(text, starts_a_document) pieces of every non-empty document, in order."""
    for kind, path in sources:
        try:
            if kind == "text":
                first = True
                for piece in text_pieces(path):
                    yield piece, first
                    first = False
                continue
            with open(path, encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"error: {path}, line {lineno}: not valid JSON "
                                         f"({e.msg} at column {e.pos + 1})")
                    except (KeyError, TypeError):
                        raise SystemExit(f'error: {path}, line {lineno}: no "text" field')
                    if not isinstance(text, str):
                        raise SystemExit(f'error: {path}, line {lineno}: "text" must be a string, '
                                         f"got {type(text).__name__}")
                    if text:
                        yield text, True
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: {path} is not UTF-8 text ({e.reason})")


try:
    enc = tiktoken.get_encoding(args.tokenizer)
except ValueError:
    raise SystemExit(f"error: unknown tokenizer {args.tokenizer!r}; "
                     f"tiktoken has {', '.join(tiktoken.list_encoding_names())}")
except Exception as e:  # tiktoken downloads the encoding on first use
    raise SystemExit(f"error: could not load tokenizer {args.tokenizer!r} ({type(e).__name__}); offline, set "
                     f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files")
dtype = np.dtype(np.uint16 if enc.n_vocab < 65536 else np.uint32)
os.makedirs(args.out_dir, exist_ok=True)
train_path, val_path = os.path.join(args.out_dir, "train.bin"), os.path.join(args.out_dir, "val.bin")
# everything goes to train.bin.tmp first; val.bin is its tail, moved out at the end, once the total is known.
# The .tmp names keep a failed or interrupted run from leaving files that look like a finished dataset.
tmp_path = train_path + ".tmp"
doc_starts = array("q")  # token offset of each document after the first: the candidate split points
n_docs = n_tokens = 0
t0, progress_shown = time.time(), False


def write(batch, out):
    global n_docs, n_tokens, progress_shown
    ids = []
    for (_, starts), tokens in zip(batch, enc.encode_ordinary_batch([text for text, _ in batch])):
        if starts:
            if n_docs:
                ids.append(enc.eot_token)
                doc_starts.append(n_tokens + len(ids))
            n_docs += 1
        ids += tokens
    np.array(ids, dtype=dtype).tofile(out)
    n_tokens += len(ids)
    print(f"\r{n_docs:,} documents, {n_tokens:,} tokens, {time.time() - t0:.0f} s", end="", file=sys.stderr)
    progress_shown = True


try:
    with open(tmp_path, "wb") as out:
        batch, batch_chars = [], 0
        for text, starts in documents():
            batch.append((text, starts))
            batch_chars += len(text)
            if batch_chars >= BATCH_CHARS:
                write(batch, out)
                batch, batch_chars = [], 0
        if batch:
            write(batch, out)
    if n_tokens == 0:
        raise SystemExit(f"error: no text found in {' '.join(args.inputs)}")
    if n_tokens < 2:
        raise SystemExit("error: the input is a single token; train.bin and val.bin need at least one each")

    want = min(max(1, round(args.val_fraction * n_tokens)), n_tokens - 1)  # neither file empty
    split, how = n_tokens - want, "inside a document"
    # the document boundary nearest the wanted split, if it gives val between half and twice its share
    i = bisect.bisect_left(doc_starts, split)
    near = [doc_starts[j] for j in (i - 1, i) if 0 <= j < len(doc_starts)]
    if near:
        best = min(near, key=lambda s: abs(s - split))
        if want / 2 <= n_tokens - best <= 2 * want:
            split, how = best, "at a document boundary"

    data = np.memmap(tmp_path, dtype=dtype, mode="r")
    with open(val_path + ".tmp", "wb") as out:
        for i in range(split, n_tokens, 1 << 24):  # copied in slices so that a large val split needs no memory
            data[i:min(i + (1 << 24), n_tokens)].tofile(out)
    del data
    os.truncate(tmp_path, split * dtype.itemsize)
    os.replace(tmp_path, train_path)
    os.replace(val_path + ".tmp", val_path)
finally:
    if progress_shown:
        print(file=sys.stderr)  # end the progress line, before any error message
    for path in (tmp_path, val_path + ".tmp"):
        if os.path.exists(path):
            os.remove(path)

with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
    json.dump({"vocab_size": enc.n_vocab, "dtype": dtype.name, "tokenizer": args.tokenizer,
               "eot_id": enc.eot_token}, f)
print(f"{n_docs:,} documents, {n_tokens:,} tokens ({args.tokenizer}, vocab {enc.n_vocab}, {dtype.name}): "
      f"train {split:,} tokens, val {n_tokens - split:,} tokens, split {how}; written to {args.out_dir}")
