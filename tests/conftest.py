import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# what ships in the repo: Tiny Shakespeare and GPT-2's BPE files (tiktoken's cache layout), so no test needs a network
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare.txt")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(ROOT, "data", "tiktoken"))

import shutil
import subprocess

import pytest


def run_train(args, cwd, check=True, **kw):
    """Runs train.py as a user would, from `cwd` (where its data/ folder is)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """A working directory whose data/shakespeare_char holds Tiny Shakespeare, prepared by the real script."""
    work = tmp_path_factory.mktemp("work")
    target = work / "data" / "shakespeare_char"
    target.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "data", "shakespeare_char", "prepare.py"), target)
    subprocess.run([sys.executable, str(target / "prepare.py"), "--input", SHAKESPEARE], check=True,
                   capture_output=True)
    return work
