"""A pytest plugin that reports each test's CPU seconds (its own, its subprocesses' and its forked runs'), which,
unlike wall time, a busy machine does not inflate: python -m pytest tests -p tests.cpu_times"""
import resource
import sys
import time

import pytest

times = {}


def cpu():
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime + sum(
        m.FORKED_CPU[0] for m in list(sys.modules.values()) if getattr(m, "__name__", "") == "conftest")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = cpu()
    yield
    times[item.nodeid] = cpu() - start


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"CPU seconds: {sum(times.values()):.0f} in all; the 30 most:")
    for nodeid, t in sorted(times.items(), key=lambda kv: -kv[1])[:30]:
        terminalreporter.write_line(f"{t:8.1f}  {nodeid}")
