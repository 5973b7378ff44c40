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


# The repository's scripts run as `python script.py ARGS` would, each in a process of its own, but forked from one
# helper that imported torch once: a run costs a fork rather than an interpreter start and ~3 s of imports. The
# child runs the script as __main__ with its argv, cwd and environment, its output in files, and exits as the
# interpreter would (an uncaught exception through sys.excepthook, status 1; SystemExit's code or message).
FORKER = r"""
import json, os, runpy, signal, sys, time
sys.path.insert(0, ROOT)
import numpy, tiktoken, torch  # what every script imports; our own modules load in each child, as they would
for line in sys.stdin:
    script, args, cwd, env, out, err, timeout = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()  # its own process group: a timeout kills whatever it started too
        os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
            if "OMP_NUM_THREADS" in env:  # read when torch loaded, in the helper: set it as a fresh process would
                torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv, code = [script, *args], 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else print(e.code, file=sys.stderr) or 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code or 0)
    deadline = time.monotonic() + timeout
    while not (done := os.wait4(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    if not done[0]:
        os.killpg(pid, signal.SIGKILL)
        done = os.wait4(pid, 0)
    print(os.waitstatus_to_exitcode(done[1]), done[2].ru_utime + done[2].ru_stime, flush=True)  # status, CPU s
""".replace("ROOT", repr(ROOT))
_forker = []
FORKED_CPU = [0.0]  # CPU seconds of all forked runs so far (tests/cpu_times.py reads it)


def run_script(script, args, cwd, check=True, env=None, timeout=600):
    """Runs one of the repository's scripts (train.py, sample.py, ...) as a user would, from `cwd`; returns a
    subprocess.CompletedProcess. check: fail the test, showing the output, unless it exits 0."""
    import json
    import tempfile
    if not _forker or _forker[0].poll() is not None:
        _forker[:] = [subprocess.Popen([sys.executable, "-c", FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)]
    forker = _forker[0]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        request = [os.path.join(ROOT, script), [str(a) for a in args], str(cwd), env and dict(env), out, err, timeout]
        forker.stdin.write(json.dumps(request) + "\n")
        forker.stdin.flush()
        code, cpu = forker.stdout.readline().split()
        code, FORKED_CPU[0] = int(code), FORKED_CPU[0] + float(cpu)
        with open(out) as o, open(err) as e:
            proc = subprocess.CompletedProcess([script, *args], code, o.read(), e.read())
    if check and code != 0:
        raise AssertionError(f"{script} failed ({code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_train(args, cwd, check=True, **kw):
    """Runs train.py as a user would, from `cwd` (where its data/ folder is)."""
    return run_script("train.py", args, cwd, check, **kw)


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
