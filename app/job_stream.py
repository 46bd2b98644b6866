"""A job as server-sent events (GET /v1/jobs/{id}/stream): what changed since the last look, read from the
database, so any API process can follow any job whichever worker runs it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fastapi.sse import ServerSentEvent
from sqlalchemy import select
from sqlalchemy.orm import Session

from .api.schemas import EventOut, JobOut
from .jobs import job_view
from .lifecycle import FINAL
from .models import Job, JobEvent, utcnow

EVENT_BATCH = 500  # events read per query; a long backlog is sent over several queries of one poll
# Ids are taken at insert, rows become visible at commit: on PostgreSQL an event can commit after one with a
# higher id (the API's cancel beside the worker's epoch), so events this recent are looked at again.
LATE_COMMIT = timedelta(seconds=30)


@dataclass
class JobWatch:
    """What one stream has sent so far, and the next messages to send."""

    job_id: str
    after: int | None = None  # the id of the last event sent
    snapshot: dict[str, Any] | None = None  # the last `job` message, without its progress
    progress: dict[str, Any] | None = None
    ended: bool = False
    # events sent (or, for ids up to the `after` a caller gave, seen by it) within LATE_COMMIT: not again
    _recent: dict[int, datetime] = field(default_factory=dict, repr=False)
    _primed: bool = field(default=False, repr=False)

    def poll(self, session: Session) -> list[ServerSentEvent]:
        """New messages: `job` when anything but progress changed, then the new events (`epoch` or `event`),
        `progress`, and `end` once the job is final and every event before it was sent."""
        job = session.get(Job, self.job_id)
        if job is None:  # deleted under the stream
            self.ended = True
            return [ServerSentEvent(event="end", data={"status": None})]
        # The job is read before its events: an event committed before the job turned final is then always
        # among those read below, so `end` never comes before the last event.
        view = JobOut.model_validate(job_view(job)).model_dump(mode="json")
        progress = view.pop("progress")
        messages: list[ServerSentEvent] = []
        if view != self.snapshot:
            self.snapshot = view
            messages.append(ServerSentEvent(event="job", data={**view, "progress": progress}))
        messages += self._new_events(session)
        if progress != self.progress:
            self.progress = progress
            messages.append(ServerSentEvent(event="progress", data=progress))
        if view["status"] in FINAL:
            self.ended = True
            messages.append(ServerSentEvent(event="end", data={"status": view["status"]}))
        return messages

    def _new_events(self, session: Session) -> list[ServerSentEvent]:
        horizon = utcnow() - LATE_COMMIT
        of_job = JobEvent.job_id == self.job_id
        if not self._primed and self.after is not None:
            rows = session.execute(select(JobEvent.id, JobEvent.created_at).where(
                of_job, JobEvent.id <= self.after, JobEvent.created_at >= horizon))
            self._recent = {event_id: created for event_id, created in rows}
        self._primed = True
        messages: list[ServerSentEvent] = []
        if self.after is not None:  # committed after a later event that was sent already: ids first, rows if any
            window = session.scalars(select(JobEvent.id).where(of_job, JobEvent.id <= self.after,
                                                               JobEvent.created_at >= horizon))
            if late := sorted(set(window) - self._recent.keys()):
                messages += [self._message(e) for e in session.scalars(
                    select(JobEvent).where(JobEvent.id.in_(late)).order_by(JobEvent.id))]
        while True:
            query = select(JobEvent).where(of_job)
            if self.after is not None:
                query = query.where(JobEvent.id > self.after)
            batch = list(session.scalars(query.order_by(JobEvent.id).limit(EVENT_BATCH)))
            messages += [self._message(e) for e in batch]
            if len(batch) < EVENT_BATCH:
                break
        self._recent = {i: t for i, t in self._recent.items() if t >= horizon}
        return messages

    def _message(self, e: JobEvent) -> ServerSentEvent:
        self._recent[e.id] = e.created_at
        self.after = max(self.after or 0, e.id)
        return ServerSentEvent(event="epoch" if e.kind == "epoch" else "event", id=str(e.id),
                               data=EventOut.model_validate(e).model_dump(mode="json"))
