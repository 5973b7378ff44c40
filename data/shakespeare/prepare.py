"""
Tiny Shakespeare with GPT-2's BPE tokenizer (tiktoken's "gpt2" encoding). Writes train.bin / val.bin (uint16 token
ids of the first 90% / last 10% of the text) and meta.json next to this file.

    python data/shakespeare/prepare.py                      # data/tinyshakespeare.txt, shipped in the repo
    python data/shakespeare/prepare.py --input path/to/other.txt

Needs no network: the text and GPT-2's BPE files (data/tiktoken, found through TIKTOKEN_CACHE_DIR) ship in the repo.
"""

import argparse
import json
import os

import numpy as np
import tiktoken

here = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(here, "..", "tinyshakespeare.txt")  # one copy in the repo for both Shakespeare datasets

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", default=SHIPPED, help="the text to use (default: the Tiny Shakespeare that ships "
                                                     "in data/tinyshakespeare.txt)")
args = parser.parse_args()

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

os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(here, "..", "tiktoken"))  # GPT-2's shipped BPE files
enc = tiktoken.get_encoding("gpt2")
# split the text, not the tokens, so that each file decodes to whole characters on its own;
# encode_ordinary: a literal "<|endoftext|>" in the text is plain text, not the separator token
n_chars = int(0.9 * len(text))
train, val = (np.array(enc.encode_ordinary(part), dtype=np.uint16) for part in (text[:n_chars], text[n_chars:]))
train.tofile(os.path.join(here, "train.bin"))
val.tofile(os.path.join(here, "val.bin"))
with open(os.path.join(here, "meta.json"), "w") as f:
    json.dump({"vocab_size": enc.n_vocab, "dtype": "uint16", "tokenizer": "gpt2", "eot_id": enc.eot_token}, f)
print(f"{len(text):,} characters, vocab {enc.n_vocab}: train {len(train):,} tokens, val {len(val):,} tokens")
