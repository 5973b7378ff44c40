"""
Tiny Shakespeare, tokenized at the character level (each distinct character one token) or, with --tokenizer=gpt2,
by GPT-2's BPE (tiktoken's "gpt2" encoding: what data/shakespeare/prepare.py runs), or with --tokenizer=bpe:N by a
byte-level BPE of N tokens trained on the training text (data.train_bpe). Writes train.bin / val.bin (uint16 token
ids of the first 90% / last 10% of the text) and meta.json into --out_dir, by default next to this file: the same
texts whatever the tokenizer, so that their val bits per byte compare.

    python data/shakespeare_char/prepare.py                      # data/tinyshakespeare.txt, shipped in the repo
    python data/shakespeare_char/prepare.py --input path/to/other.txt
    python data/shakespeare_char/prepare.py --tokenizer=bpe:2048 --out_dir=data/shakespeare_bpe

Needs no network: the text and GPT-2's BPE files (data/tiktoken, found through TIKTOKEN_CACHE_DIR) ship in the repo.
"""

import argparse
import json
import os

import sys

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(here, "..", "tinyshakespeare.txt")  # one copy in the repo for both Shakespeare datasets

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", default=SHIPPED, help="the text to use (default: the Tiny Shakespeare that ships "
                                                     "in data/tinyshakespeare.txt)")
parser.add_argument("--tokenizer", default="char", help="char, gpt2 or bpe:N (default: %(default)s)")
parser.add_argument("--out_dir", default=here, help="where the files go (default: next to this script)")
args = parser.parse_args()
if args.tokenizer not in ("char", "gpt2") and not (args.tokenizer.startswith("bpe:") and args.tokenizer[4:].isdigit()):
    raise SystemExit(f"error: --tokenizer={args.tokenizer}: give char, gpt2 or bpe:N (N tokens, e.g. bpe:2048)")
if args.tokenizer.startswith("bpe:") and int(args.tokenizer[4:]) > 65536:
    raise SystemExit(f"error: --tokenizer={args.tokenizer}: token ids are written as uint16; give at most bpe:65536")

path = args.input
if not os.path.exists(path):
    raise SystemExit(f"error: --input {path} does not exist")
if os.path.isdir(path):
    raise SystemExit(f"error: --input {path} is a directory; give a text file")
try:
    with open(path, encoding="utf-8") as f:
        text = f.read()
except UnicodeDecodeError as e:
    raise SystemExit(f"error: --input {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
if len(text) < 100:
    raise SystemExit(f"error: --input {path} holds {len(text)} characters; train.bin and val.bin need far more")

n_chars = int(0.9 * len(text))
if args.tokenizer == "char":
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    encode = lambda s: [stoi[c] for c in s]  # noqa: E731
    meta = {"vocab_size": len(chars), "dtype": "uint16", "tokenizer": "char", "chars": "".join(chars), "eot_id": None}
elif args.tokenizer.startswith("bpe:"):  # learnt from the training text alone
    sys.path.insert(0, os.path.join(here, "..", ".."))  # the repository: data.py
    import data
    try:
        bpe = data.train_bpe([text[:n_chars]], int(args.tokenizer[4:]))
    except (ImportError, ValueError) as e:
        raise SystemExit(f"error: --tokenizer={args.tokenizer}: {e}")
    meta = {"vocab_size": len(bpe["tokens"]) + 1, "dtype": "uint16", "tokenizer": "bpe", "eot_id": len(bpe["tokens"]),
            "bpe": bpe}
    encode = data.Tokenizer(meta).backend.encode_ordinary
else:
    import tiktoken
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(here, "..", "tiktoken"))  # GPT-2's shipped BPE files
    enc = tiktoken.get_encoding("gpt2")
    encode = enc.encode_ordinary  # a literal "<|endoftext|>" in the text is plain text, not the separator token
    meta = {"vocab_size": enc.n_vocab, "dtype": "uint16", "tokenizer": "gpt2", "eot_id": enc.eot_token}
# split the text, not the tokens, so that each file decodes to whole characters on its own
train, val = (np.array(encode(part), dtype=np.uint16) for part in (text[:n_chars], text[n_chars:]))
os.makedirs(args.out_dir, exist_ok=True)
train.tofile(os.path.join(args.out_dir, "train.bin"))
val.tofile(os.path.join(args.out_dir, "val.bin"))
with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
    json.dump(meta, f)
print(f"{len(text):,} characters, vocab {meta['vocab_size']}: train {len(train):,} tokens, val {len(val):,} tokens")
