"""
Tiny Shakespeare at the character level, each distinct character one token. Writes train.bin / val.bin (uint16
token ids of the first 90% / last 10% of the text) and meta.json next to this file.

    python data/shakespeare_char/prepare.py                      # data/tinyshakespeare.txt, shipped in the repo
    python data/shakespeare_char/prepare.py --input path/to/other.txt
"""

import argparse
import json
import os

import numpy as np

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

chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
ids = np.array([stoi[c] for c in text], dtype=np.uint16)
n_train = int(0.9 * len(ids))
ids[:n_train].tofile(os.path.join(here, "train.bin"))
ids[n_train:].tofile(os.path.join(here, "val.bin"))
with open(os.path.join(here, "meta.json"), "w") as f:
    json.dump({"vocab_size": len(chars), "dtype": "uint16", "tokenizer": "char", "chars": "".join(chars),
               "eot_id": None}, f)
print(f"{len(text):,} characters, vocab {len(chars)}: train {n_train:,} tokens, val {len(ids) - n_train:,} tokens")
