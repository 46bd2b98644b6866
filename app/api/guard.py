"""The request guard: pure ASGI middleware that decides whether a request may go on before any route,
form parser or upload handler sees it, so a refused request has had none of its body read.

In order:
- Host allow-list (400 `host_not_allowed`): with keys switched off, only 127.0.0.1, localhost, [::1] and
  the address the connection came in on, at the server's port, unless KDISTILL_ALLOWED_HOSTS says
  otherwise; with keys required, only when KDISTILL_ALLOWED_HOSTS is set. Stops DNS rebinding: a page
  whose own name resolves to 127.0.0.1 still sends its own name as Host.
- Origin (403 `origin_not_allowed`), with keys switched off: a POST/PUT/PATCH/DELETE that carries an
  Origin header must come from the server's own origin or one of KDISTILL_ALLOWED_ORIGINS. Browsers send
  Origin on cross-site posts (forms included); curl and the Python client send none and pass.
- API key (401 `missing_api_key` / `invalid_api_key`) for every /v1 request, through `deps.authenticate`;
  the caller's TenantRef goes into `scope["state"]` for the `current_tenant` dependency.

A refusal of a request that has a body says `Connection: close`, so the server hangs up instead of reading
(and discarding) the rest of a large upload.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.db import database_unreachable
from app.settings import Settings

from .deps import TENANT_STATE, authenticate, cached_tenant
from .errors import RETRY_AFTER_SECONDS, ApiError, database_unavailable, error_body

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def split_host(value: str, scheme: str = "http") -> tuple[str, int | None]:
    """`name[:port]` (IPv6 in brackets) as (lower-case name, port); the port is None when absent."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        end = value.find("]")
        name, rest = value[:end + 1], value[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        name, port = value, ""
    if port and not port.isdigit():
        raise ValueError(f"bad port in {value!r}")
    return name, int(port) if port else None


def _items(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


class RequestGuard:
    """See the module's docstring."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.local = settings.auth == "disabled"
        listed = _items(settings.allowed_hosts)
        self.any_host = "*" in listed
        # (name, port or None for any port); None: the default list, which depends on the server's port
        self.hosts = [split_host(h) for h in listed if h != "*"] if listed else None
        self.origins = {_origin(o) for o in _items(settings.allowed_origins)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            host = self._check_host(scope, headers)
            if self.local and scope["method"] in STATE_CHANGING:
                self._check_origin(scope, headers, host)
            path = scope.get("path", "")
            if path == "/v1" or path.startswith("/v1/"):
                authorization = headers.get("authorization")
                ref = cached_tenant(self.settings, authorization)
                if ref is None:
                    try:
                        ref = await run_in_threadpool(authenticate, self.settings, authorization)
                    except Exception as e:
                        if not database_unreachable(e):
                            raise
                        raise database_unavailable() from None
                scope.setdefault("state", {})[TENANT_STATE] = ref
        except ApiError as e:
            await _refuse(e, scope, receive, send, has_body=_has_body(headers))
            return
        await self.app(scope, receive, send)

    def _check_host(self, scope: Scope, headers: Headers) -> tuple[str, int] | None:
        """The request's (host, port) when the check applies and passes; raises 400 when it fails."""
        if self.any_host or (self.hosts is None and not self.local):
            return None
        scheme = scope.get("scheme", "http")
        raw = headers.get("host")
        try:
            if raw is None:
                raise ValueError("no Host header")
            name, port = split_host(raw)
        except ValueError:
            raise ApiError(400, "host_not_allowed", "the request has no usable Host header") from None
        port = port if port is not None else DEFAULT_PORTS.get(scheme, 80)
        if self.hosts is not None:
            allowed = any(name == n and (p is None or p == port) for n, p in self.hosts)
        else:
            server = scope.get("server") or (None, None)
            own = server[0] if server[0] is None or ":" not in str(server[0]) else f"[{server[0]}]"
            names = {*LOOPBACK_NAMES, *([str(own).lower()] if own else [])}
            allowed = name in names and (server[1] is None or port == server[1])
        if not allowed:
            raise ApiError(400, "host_not_allowed", f"this server does not answer to the host name {raw!r}; call "
                           "it as http://127.0.0.1:<port> or http://localhost:<port>, or list the name in "
                           "KDISTILL_ALLOWED_HOSTS")
        return name, port

    def _check_origin(self, scope: Scope, headers: Headers, host: tuple[str, int] | None) -> None:
        origin = headers.get("origin")
        if origin is None:  # not sent by a browser page: curl, the Python client, scripts
            return
        scheme = scope.get("scheme", "http")
        if host is None:
            try:
                name, port = split_host(headers.get("host", ""))
                host = name, port if port is not None else DEFAULT_PORTS.get(scheme, 80)
            except ValueError:
                host = None
        try:
            seen = _origin(origin)
        except ValueError:
            seen = None
        if seen is not None and (seen in self.origins or (host is not None and seen == (scheme, *host))):
            return
        raise ApiError(403, "origin_not_allowed", f"requests that change something are not taken from web pages "
                       f"of other sites (Origin {origin[:100]!r}); list the origin in KDISTILL_ALLOWED_ORIGINS "
                       "if it is yours")


def _origin(value: str) -> tuple[str, str, int]:
    """An Origin (`scheme://host[:port]`) as (scheme, host, port) with the scheme's default port filled in."""
    parts = urlsplit(value.strip().lower())
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"not an origin: {value!r}")
    name, port = split_host(parts.netloc)
    return parts.scheme, name, port if port is not None else DEFAULT_PORTS[parts.scheme]


def _has_body(headers: Headers) -> bool:
    length = headers.get("content-length", "")
    return "transfer-encoding" in headers or (length.isdigit() and int(length) > 0) or bool(
        length and not length.isdigit())


async def _refuse(e: ApiError, scope: Scope, receive: Receive, send: Send, has_body: bool) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if e.status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    if has_body:  # hang up rather than drain a body nobody will read
        headers["Connection"] = "close"
    response = JSONResponse(error_body(e.code, e.message, e.field, **e.extra), status_code=e.status,
                            headers=headers)
    await response(scope, receive, send)
