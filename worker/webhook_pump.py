"""Sends the webhook deliveries that app.webhooks queued: one thread per worker process (worker.registry starts
it), each delivery claimed with a conditional UPDATE so that several workers never make the same attempt
twice. Every attempt is a job event (kind "webhook"); failures are retried with exponential backoff until
`webhook_retry_for` after the event. Delivery is at least once: a worker lost mid-call leaves its lease to
expire, and another worker calls again (receivers tell repeats apart by Kdistill-Delivery)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select, update

from app import webhooks
from app.db import session_scope
from app.jobs import add_event
from app.keys import secret_for_tenant
from app.models import Job, Tenant, WebhookDelivery, utcnow
from app.settings import Settings

log = logging.getLogger("kdistill.webhooks")
LEASE_MARGIN = 30.0  # seconds past the call's timeout before another worker may take a claimed delivery
BATCH = 20


@dataclass(frozen=True)
class Claimed:
    """One attempt this worker holds: the delivery as of its claim."""

    id: str
    job_id: str
    event: str
    url: str
    payload: dict[str, Any]
    attempt: int
    secret: str


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    final: bool = False  # no retry whatever the schedule says (the address is refused)

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def backoff(settings: Settings, attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): retry_first doubling, up to retry_max_delay."""
    return min(settings.webhook_retry_first * 2 ** min(attempt - 1, 64), settings.webhook_retry_max_delay)


def deliver_due(settings: Settings, limit: int = BATCH, http: httpx.Client | None = None) -> int:
    """Make one attempt of each delivery that is due (at most `limit`); the number of attempts made."""
    url = settings.resolved_database_url
    with session_scope(url) as s:
        due = s.execute(select(WebhookDelivery.id, WebhookDelivery.attempts, WebhookDelivery.next_attempt_at)
                        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
                        .order_by(WebhookDelivery.next_attempt_at).limit(limit)).all()
    if not due:
        return 0
    own = http is None
    http = http or new_client(settings)
    made = 0
    try:
        for row in due:
            claimed = claim(settings, row.id, row.attempts, row.next_attempt_at)
            if claimed is None:
                continue  # another worker took it, or its job is gone
            record(settings, claimed, attempt(settings, claimed, http))
            made += 1
    finally:
        if own:
            http.close()
    return made


def new_client(settings: Settings) -> httpx.Client:
    # httpx logs each request's full URL at INFO; a callback URL's query often holds the receiver's token, and
    # record() logs every attempt without it.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Redirects are not followed: one could lead to an address the check below would refuse.
    return httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False,
                        headers={"User-Agent": webhooks.USER_AGENT})


def claim(settings: Settings, delivery_id: str, attempts: int, next_attempt_at: datetime) -> Claimed | None:
    """Take the next attempt of a delivery seen as due with (attempts, next_attempt_at); None when another
    worker was first. The claim is a lease: unless recorded, the delivery is due again after it."""
    lease = utcnow() + timedelta(seconds=settings.webhook_timeout + LEASE_MARGIN)
    with session_scope(settings.resolved_database_url) as s:
        taken = s.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
            WebhookDelivery.attempts == attempts, WebhookDelivery.next_attempt_at == next_attempt_at,
        ).values(attempts=attempts + 1, next_attempt_at=lease).execution_options(synchronize_session=False)).rowcount
        if not taken:
            return None
        d = s.get(WebhookDelivery, delivery_id)
        tenant = s.get(Tenant, d.tenant_id) if d is not None else None
        if d is None or tenant is None:
            return None
        return Claimed(d.id, d.job_id, d.event, d.url, d.payload, d.attempts, secret_for_tenant(s, tenant))


def attempt(settings: Settings, d: Claimed, http: httpx.Client) -> Outcome:
    """POST the delivery once, signed; never raises."""
    try:
        # again here, not only when the job was created: the name may resolve elsewhere by now
        webhooks.check_address(d.url, settings.webhook_allow_private)
    except webhooks.CallbackRefused as e:
        return Outcome(None, e.message, final=e.code == "callback_url_not_allowed")
    body = webhooks.body_bytes(d.payload)
    headers = {"Content-Type": "application/json", webhooks.EVENT_HEADER: d.event, webhooks.DELIVERY_HEADER: d.id,
               webhooks.SIGNATURE_HEADER: webhooks.sign(d.secret, body, int(time.time()))}
    try:
        # streamed and never read: a receiver's answer body is of no use and could be huge
        with http.stream("POST", d.url, content=body, headers=headers) as response:
            code = response.status_code
    except httpx.HTTPError as e:
        return Outcome(None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    return Outcome(code, None if 200 <= code < 300 else f"HTTP {code}")


def record(settings: Settings, d: Claimed, outcome: Outcome) -> None:
    """Write the attempt's result and its job event; schedule the next attempt or end the delivery."""
    now = utcnow()
    with session_scope(settings.resolved_database_url) as s:
        row = s.get(WebhookDelivery, d.id, with_for_update=True)
        if row is None or row.attempts != d.attempt or row.status != "pending":
            log.info("webhook delivery %s: its job was deleted or another worker took it over", d.id)
            return
        row.last_status_code, row.last_error = outcome.status_code, outcome.error
        target = f"webhook {d.event} to {webhooks.shown_url(d.url)}"
        what = outcome.error or f"HTTP {outcome.status_code}"
        data: dict[str, Any] = {"delivery_id": d.id, "event": d.event, "attempt": d.attempt,
                                "status_code": outcome.status_code, "error": outcome.error, "next_attempt_at": None}
        if outcome.ok:
            row.status, row.finished_at = "delivered", now
            message = f"{target}: delivered (attempt {d.attempt}, HTTP {outcome.status_code})"
        else:
            delay = backoff(settings, d.attempt)
            deadline = row.created_at + timedelta(seconds=settings.webhook_retry_for)
            if outcome.final or now + timedelta(seconds=delay) > deadline:
                row.status, row.finished_at = "failed", now
                message = f"{target}: {what} (attempt {d.attempt}); giving up after {d.attempt} attempts"
            else:
                row.next_attempt_at = now + timedelta(seconds=delay)
                data["next_attempt_at"] = row.next_attempt_at.isoformat()
                message = f"{target}: {what} (attempt {d.attempt}); retrying in {delay:g} s"
        if s.get(Job, d.job_id) is not None:
            add_event(s, d.job_id, "webhook", message, **data)
    (log.info if outcome.ok else log.warning)("job %s: %s", d.job_id, message)


class WebhookPump(threading.Thread):
    """Delivers what is due every `webhook_poll_interval` until stopped; a database outage only skips ticks."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="kdistill-webhooks", daemon=True)
        self.settings = settings
        self._stop_event = threading.Event()

    def run(self) -> None:
        with new_client(self.settings) as http:
            while not self._stop_event.is_set():
                try:
                    # a full batch: more may be due at once
                    while deliver_due(self.settings, BATCH, http) == BATCH and not self._stop_event.is_set():
                        pass
                except Exception:
                    log.warning("webhooks: could not deliver (the database may be down); trying again in %g s",
                                self.settings.webhook_poll_interval, exc_info=True)
                self._stop_event.wait(self.settings.webhook_poll_interval)

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to end and wait up to `timeout` s for the attempt in flight."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)
