"""
Tiny Shakespeare with GPT-2's BPE tokenizer (tiktoken's "gpt2" encoding). Writes train.bin / val.bin (uint16 token
ids of the first 90% / last 10% of the text) and meta.json next to this file.

    python data/shakespeare/prepare.py                      # downloads input.txt
    python data/shakespeare/prepare.py --input path/to/input.txt   # no network needed for the text

tiktoken downloads the GPT-2 BPE files on first use; offline, point TIKTOKEN_CACHE_DIR at a copy of its cache.
"""

import argparse
import json
import os
import urllib.request

import numpy as np
import tiktoken

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
here = os.path.dirname(os.path.abspath(__file__))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", help="an existing text file to use instead of downloading Tiny Shakespeare")
args = parser.parse_args()

path = args.input or os.path.join(here, "input.txt")
if not os.path.exists(path):
    if args.input:
        raise SystemExit(f"error: {path} does not exist")
    print(f"downloading {URL}")
    try:
        urllib.request.urlretrieve(URL, path + ".part")  # renamed when complete: no half file is ever reused
    except OSError as e:
        raise SystemExit(f"error: could not download Tiny Shakespeare ({e}); "
                         f"pass a local copy with --input PATH") from None
    os.replace(path + ".part", path)
if os.path.isdir(path):
    raise SystemExit(f"error: --input {path} is a directory; give a text file")
try:
    with open(path, encoding="utf-8") as f:
        text = f.read()
except UnicodeDecodeError as e:
    raise SystemExit(f"error: --input {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
if len(text) < 100:
    raise SystemExit(f"error: --input {path} holds {len(text)} characters; train.bin and val.bin need far more")

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
