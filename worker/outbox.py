"""Database writes of a running job that wait out a database outage: written late, in order, never lost.

Training goes on while the database is unreachable; the supervisor puts each write (an epoch's metrics and
event, a phase, a warning, progress) here, and the outbox writes what it holds, oldest first, whenever
the database answers again. Progress is coalesced: only the newest is worth writing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from app.db import database_unreachable, session_scope

log = logging.getLogger("kdistill.worker")
RETRY_MIN, RETRY_MAX = 0.5, 5.0

Write = Callable[[Session], bool]  # False: the lease is lost, the write did nothing


class LeaseLost(Exception):
    """The job is no longer ours: another worker holds it, or it ended."""


@dataclass
class Outbox:
    url: str
    job_id: str
    pending: list[tuple[str, Write]] = field(default_factory=list)
    retry_at: float = 0.0
    delay: float = RETRY_MIN
    down_since: float | None = None

    def put(self, what: str, write: Write, coalesce: bool = False) -> None:
        if coalesce:
            self.pending = [(w, f) for w, f in self.pending if w != what]
        self.pending.append((what, write))

    def flush(self, force: bool = False) -> bool:
        """Write what is pending, oldest first; True when nothing is left. Raises LeaseLost."""
        if not self.pending:
            return True
        if not force and time.monotonic() < self.retry_at:
            return False
        while self.pending:
            what, write = self.pending[0]
            try:
                with session_scope(self.url) as s:
                    if not write(s):
                        raise LeaseLost(what)
            except LeaseLost:
                self.pending.clear()
                raise
            except Exception as e:
                if not database_unreachable(e):
                    raise
                self._failed(what)
                return False
            self.pending.pop(0)
        if self.down_since is not None:
            log.warning("job %s: the database answers again after %.0f s; pending writes are done", self.job_id,
                        time.monotonic() - self.down_since)
        self.down_since, self.delay = None, RETRY_MIN
        return True

    def drain(self, deadline: float) -> None:
        """Flush until empty, waiting out an outage until `deadline` (monotonic); raises the last error."""
        while not self.flush(force=True):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the database was unreachable for too long; {len(self.pending)} writes lost")
            time.sleep(max(0.0, self.retry_at - time.monotonic()))

    def _failed(self, what: str) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning("job %s: the database is unreachable (writing %s); training goes on and %d write(s) "
                        "wait", self.job_id, what, len(self.pending))
        self.retry_at = now + self.delay
        self.delay = min(self.delay * 2, RETRY_MAX)
