"""Webhooks: a job's callback_url hears of its final status (and, when asked, of each epoch), signed.

`announce` adds a delivery row in the transaction that records the event (app.lifecycle, the supervisor); the
worker side (worker.webhook_pump) sends it, retries it with backoff and records each attempt as a job event.
Each call carries `Kdistill-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>` with the
tenant's secret (app.keys.webhook_secret); `verify` checks one the way a receiver should.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from .api.errors import ApiError
from .api.schemas import JobOut
from .jobs import job_view
from .models import Job, WebhookDelivery
from .settings import Settings

EPOCH = "job.epoch"
USER_AGENT = "kdistill-webhooks/1"
SIGNATURE_HEADER, EVENT_HEADER, DELIVERY_HEADER = "Kdistill-Signature", "Kdistill-Event", "Kdistill-Delivery"
ALLOW_SETTING = "KDISTILL_WEBHOOK_ALLOW_PRIVATE"
SCHEMES = ("http", "https")


def final_event(status: str) -> str:
    """The event name of a final status: job.succeeded, job.failed or job.cancelled."""
    return f"job.{status}"


def announce(session: Session, job: Job, event: str) -> None:
    """Queue a delivery of `event` for `job` when it has a callback_url (and, for epochs, callback_epochs);
    the job object the receiver gets holds the epoch's progress and metrics."""
    request = job.request or {}
    url = request.get("callback_url")
    if not url or (event == EPOCH and not request.get("callback_epochs")):
        return
    # The caller may have just added artifacts by job_id (lifecycle.conclude): write them and reload the
    # relationship so that the payload lists them.
    session.flush()
    session.expire(job, ["artifacts"])
    session.add(WebhookDelivery(job_id=job.id, tenant_id=job.tenant_id, event=event, url=url,
                                payload=job_payload(job)))


def job_payload(job: Job) -> dict[str, Any]:
    """The job exactly as `GET /v1/jobs/{id}` shows it, as JSON-ready data."""
    return JobOut.model_validate(job_view(job)).model_dump(mode="json")


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The bytes sent (and signed) for a payload: compact JSON with sorted keys."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


# -- signatures ---------------------------------------------------------------------------------------
def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The Kdistill-Signature header of `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, tolerance: float = 300, now: float | None = None) -> bool:
    """True when `header` (Kdistill-Signature) signs `body` with `secret` and is at most `tolerance` s old."""
    timestamp, macs = None, []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            macs.append(value)
    if timestamp is None or not macs:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:  # a replayed old call
        return False
    expected = sign(secret, body, timestamp).partition(",v1=")[2]
    return any(hmac.compare_digest(expected, mac) for mac in macs)


# -- which URLs may be called -------------------------------------------------------------------------
class CallbackRefused(ValueError):
    """A callback URL that may not be called: `code` is invalid_callback_url or callback_url_not_allowed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def refused_reason(address: str) -> str | None:
    """Why an IP address may not be called ("loopback", "private", ...); None for a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is no part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    for reason in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{reason}"):
            return reason.replace("_", "-")
    # e.g. 100.64.0.0/10 (carrier-grade NAT): not private by the RFCs, yet nothing outside should reach it
    return None if ip.is_global else "non-global"


def _host_and_port(url: str) -> tuple[str, int]:
    if not isinstance(url, str) or not url.strip():
        raise CallbackRefused("invalid_callback_url", "callback_url is empty; give an http:// or https:// URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise CallbackRefused("invalid_callback_url", f"callback_url {url!r} is not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise CallbackRefused("invalid_callback_url", f"callback_url must be an http:// or https:// URL, not "
                              f"{scheme + '://' if scheme else url!r}")
    if "@" in parts.netloc:
        raise CallbackRefused("invalid_callback_url", "callback_url must not carry a user name or password "
                              "(user:password@host); the calls are signed (Kdistill-Signature) instead")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise CallbackRefused("invalid_callback_url", "callback_url must not contain spaces or control characters")
    if not parts.hostname:
        raise CallbackRefused("invalid_callback_url", f"callback_url {url!r} names no host")
    return parts.hostname, port or (443 if scheme == "https" else 80)


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` stands for: itself when it is an IP literal, else what the resolver says."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise CallbackRefused("invalid_callback_url", f"the host of callback_url, {host!r}, does not resolve "
                              f"({e}); give a name this service's DNS can resolve") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_address(url: str, allow_private: bool) -> None:
    """Raise CallbackRefused unless `url` is an http(s) URL whose host resolves to public addresses only
    (any address, with `allow_private`)."""
    host, port = _host_and_port(url)
    addresses = resolve(host, port)
    if allow_private:
        return
    for address in addresses:
        if reason := refused_reason(address):
            named = host if host == address else f"{host} ({address})"
            raise CallbackRefused("callback_url_not_allowed", f"callback_url points at {named}, a {reason} "
                                  f"address; webhooks only call public addresses unless the deployment sets "
                                  f"{ALLOW_SETTING}=true")


def check_callback_url(url: str, settings: Settings) -> None:
    """A job request's callback_url as the API checks it: ApiError 422 when it may not be called."""
    try:
        check_address(url, settings.webhook_allow_private)
    except CallbackRefused as e:
        raise ApiError(422, e.code, e.message, "callback_url") from None


def shown_url(url: str) -> str:
    """The URL for events and logs: without its query and fragment, which often hold a token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?…" if parts.query else "")
