"""Shared pytest plumbing.

``fuzz_cases`` counts the cases the fuzz tests try; the count is printed in the
terminal summary of every run that executed them (issue 5: "record the number of
cases tried per run in the test output"), also when pytest-xdist runs the tests in
several worker processes (each worker hands its counts to the controller).
Under xdist each worker gets an equal share of the CPU threads (no oversubscription).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

FUZZ_CASES = pytest.StashKey[Counter]()


@pytest.fixture
def float64_default():
    """Make float64 the default dtype for one test (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def fuzz_cases(request) -> Counter:
    """A Counter keyed by ``"<target>: <kind>"``; increment it once per fuzz case tried."""
    return request.config.stash.setdefault(FUZZ_CASES, Counter())


def pytest_configure(config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_sessionfinish(session) -> None:
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the counts to the controller
        session.config.workeroutput["fuzz_cases"] = dict(session.config.stash.get(FUZZ_CASES, Counter()))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist controller: add up the fuzz cases each worker tried."""
    counts = node.workeroutput.get("fuzz_cases") if hasattr(node, "workeroutput") else None
    if counts:
        node.config.stash.setdefault(FUZZ_CASES, Counter()).update(counts)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    counts = config.stash.get(FUZZ_CASES, None)
    if not counts:
        return
    targets = Counter()
    for key, n in counts.items():
        targets[key.partition(":")[0]] += n
    terminalreporter.write_sep("-", "fuzz cases tried")
    terminalreporter.write_line(
        f"{sum(counts.values())} fuzz cases tried: " + ", ".join(f"{t} {n}" for t, n in sorted(targets.items()))
    )
    for target in sorted(targets):
        kinds = sorted((k.partition(": ")[2], n) for k, n in counts.items() if k.startswith(target + ":"))
        terminalreporter.write_line(f"  {target}: " + ", ".join(f"{kind} {n}" for kind, n in kinds))
