"""Shared pytest plumbing.

``fuzz_cases`` counts the cases the fuzz tests try; the count is printed in the
terminal summary of every run that executed them (issue 5: "record the number of
cases tried per run in the test output").
"""

from __future__ import annotations

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
