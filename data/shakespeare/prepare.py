"""
Tiny Shakespeare with GPT-2's BPE tokenizer (tiktoken's "gpt2" encoding), written next to this file: the character
dataset's script with --tokenizer=gpt2 (data/shakespeare_char/prepare.py, which says more).

    python data/shakespeare/prepare.py                      # data/tinyshakespeare.txt, shipped in the repo
    python data/shakespeare/prepare.py --input path/to/other.txt
"""

import os
import runpy
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.argv[1:1] = ["--tokenizer=gpt2", f"--out_dir={here}"]
runpy.run_path(os.path.join(here, "..", "shakespeare_char", "prepare.py"), run_name="__main__")
