import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the offline copies CI and developers have beside the repo; tests that need them skip when they are absent
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
TIKTOKEN_CACHE = os.path.join(ROOT, "..", "shared", "data", "tiktoken")
if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)

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
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE}")
    work = tmp_path_factory.mktemp("work")
    target = work / "data" / "shakespeare_char"
    target.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "data", "shakespeare_char", "prepare.py"), target)
    subprocess.run([sys.executable, str(target / "prepare.py"), "--input", SHAKESPEARE], check=True,
                   capture_output=True)
    return work
