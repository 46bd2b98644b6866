"""What the schemathesis run saw: every case's operation, phase and status, and the responses that broke the
documented schema; summed up for the terminal (conftest.py prints FUZZ_SUMMARY at the end of the run)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest

FUZZ_SUMMARY = pytest.StashKey[list[str]]()


@dataclass(frozen=True)
class Nonconforming:
    operation: str
    status: int
    checks: tuple[str, ...]  # titles of the failed schemathesis checks
    curl: str  # the request, replayable
    body: str  # the start of the response body


@dataclass
class FuzzLog:
    # (documented operation "METHOD /path", method sent, phase, status); the coverage phase also sends methods
    # the path does not document, which must answer 405
    cases: list[tuple[str, str, str, int]] = field(default_factory=list)
    nonconforming: list[Nonconforming] = field(default_factory=list)

    def distinct_nonconforming(self) -> list[Nonconforming]:
        """One example (the shortest request) per (operation, status, failed checks)."""
        best: dict[tuple[str, int, tuple[str, ...]], Nonconforming] = {}
        for n in self.nonconforming:
            key = (n.operation, n.status, n.checks)
            if key not in best or len(n.curl) < len(best[key].curl):
                best[key] = n
        return sorted(best.values(), key=lambda n: (n.operation, n.status))

    def summary(self) -> list[str]:
        statuses: dict[str, Counter[int]] = defaultdict(Counter)
        unexpected: Counter[int] = Counter()
        for operation, method, _, status in self.cases:
            if operation.split(" ", 1)[0] == method.upper():
                statuses[operation][status] += 1
            else:
                unexpected[status] += 1
        phases = Counter(phase for _, _, phase, _ in self.cases)
        lines = [f"{len(self.cases)} cases over {len(statuses)} operations; by phase: "
                 + ", ".join(f"{p} {n}" for p, n in sorted(phases.items())),
                 f"server errors (>= 500): {sum(1 for *_, s in self.cases if s >= 500)}; responses off the "
                 f"documented schema: {len(self.nonconforming)} ({len(self.distinct_nonconforming())} distinct)"]
        for operation in sorted(statuses, key=lambda o: (o.split(" ", 1)[1], o)):
            lines.append(f"  {operation:42s} {_counts(statuses[operation])}")
        if unexpected:
            lines.append(f"  {'undocumented methods (coverage phase)':42s} {_counts(unexpected)}")
        for n in self.distinct_nonconforming():
            lines.append(f"  off-schema: {n.operation} -> {n.status} ({'; '.join(n.checks)}): {n.curl}")
        return lines


def _counts(counter: Counter[int]) -> str:
    return f"{sum(counter.values()):4d} cases: " + ", ".join(f"{s} x{n}" for s, n in sorted(counter.items()))
