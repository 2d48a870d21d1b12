"""Who may drive this server: the ``Origin`` and ``Host`` allowlists.

The backend listens on the user's own machine, so any web page open in the user's browser
can reach it. A page may send requests that need no CORS preflight (a form post, a
``text/plain`` fetch, an ``<img>``), so refusing CORS headers is not enough: a request from a
page whose origin is not allowed is refused before any route runs. And a DNS-rebinding name
(a hostile domain that resolves to 127.0.0.1) makes such a page same-origin, so the ``Host``
header must name this machine too. Requests with no ``Origin`` (the desktop app's own
process, curl, scripts) are served as before: no web page can send a request without one,
except simple loads (``<img>``, navigation) that cannot read the answer across origins.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
PACKAGED_UI_ORIGIN = "app://-"
"""The packaged Electron renderer's origin (electron-serve's default scheme and host)."""
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")

_LOOPBACK_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?$")
_LOOPBACK_ORIGINS_TEXT = "http(s)://localhost|127.0.0.1|[::1] on any port"
_HOST_WITH_PORT = re.compile(r"^(?P<name>\[[0-9a-f:.]+\]|[^:\[\]]+)(:\d{1,5})?$")


def _split(joined: str) -> list[str]:
    return [part for part in joined.split(",") if part] if joined else []


def normalize_origin(origin: str) -> str:
    """Origins compare case-insensitively, without a trailing slash."""
    return origin.strip().rstrip("/").lower()


def host_name(host_header: str) -> str | None:
    """``localhost:8000`` -> ``localhost``; ``[::1]:8000`` -> ``[::1]``; None if malformed."""
    match = _HOST_WITH_PORT.match(host_header.strip().lower())
    return match.group("name") if match else None


@dataclass(frozen=True)
class AccessPolicy:
    """The allowlists, built once from the settings (``LOCALAI_ALLOWED_ORIGINS``,
    ``LOCALAI_ALLOWED_HOSTS``, ``LOCALAI_HOST``)."""

    extra_origins: frozenset[str]
    any_origin: bool
    extra_hosts: frozenset[str]
    any_host: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        origins = {normalize_origin(origin) for origin in settings.allowed_origins}
        hosts = {name for name in map(host_name, settings.allowed_hosts) if name}
        # The address the server is bound to names this machine (an IP address cannot be
        # rebound); a wildcard bind names no host, so names must then be listed.
        bound = host_name(settings.host if ":" not in settings.host else f"[{settings.host}]")
        if bound and settings.host not in WILDCARD_ADDRESSES:
            hosts.add(bound)
        return cls(
            extra_origins=frozenset(origins - {"*"}),
            any_origin="*" in origins,
            extra_hosts=frozenset(hosts - {"*", *LOOPBACK_HOSTS}),
            any_host="*" in settings.allowed_hosts,
        )

    def origin_allowed(self, origin: str) -> bool:
        normalized = normalize_origin(origin)
        return (
            self.any_origin
            or normalized == PACKAGED_UI_ORIGIN
            or _LOOPBACK_ORIGIN.match(normalized) is not None
            or normalized in self.extra_origins
        )

    def host_allowed(self, host_header: str) -> bool:
        name = host_name(host_header)
        if name is None:
            return False
        return self.any_host or name in LOOPBACK_HOSTS or name in self.extra_hosts

    def refusal(self, hosts: Sequence[str], origins: Sequence[str]) -> str | None:
        """Why a request with these ``Host`` and ``Origin`` header values is refused, or None
        when it is served. Every value must pass: a second header cannot smuggle a name past
        a check that reads only the first. A request without ``Host`` (HTTP/1.0) names no
        host that could have been rebound."""
        for host in hosts:
            if not self.host_allowed(host):
                return f"Host {host} is not allowed; add it to LOCALAI_ALLOWED_HOSTS"
        for origin in origins:
            if not self.origin_allowed(origin):
                return f"Origin {origin} is not allowed; add it to LOCALAI_ALLOWED_ORIGINS"
        return None

    def socket_handshake_allowed(self, origin: str | None, environ: dict[str, Any]) -> bool:
        """python-socketio's ``cors_allowed_origins`` callable: the same checks (its environ
        joins repeated headers with commas, which neither a host nor an origin contains)."""
        hosts = environ.get("HTTP_HOST", "")
        origins = origin or ""
        return self.refusal(_split(hosts), _split(origins)) is None

    def describe(self) -> str:
        """One log line: what is allowed."""
        origins = (
            "any origin"
            if self.any_origin
            else ", ".join(
                [_LOOPBACK_ORIGINS_TEXT, PACKAGED_UI_ORIGIN, *sorted(self.extra_origins)]
            )
        )
        hosts = (
            "any host" if self.any_host else ", ".join([*LOOPBACK_HOSTS, *sorted(self.extra_hosts)])
        )
        return f"Allowed origins: {origins}. Allowed hosts: {hosts} (any port)."


class LocalAccessGuard:
    """Refuses (403, no CORS headers) any HTTP request or websocket handshake that
    :meth:`AccessPolicy.refusal` refuses, before Socket.IO, CORS or any route sees it."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = Headers(scope=scope)
            refusal = self.policy.refusal(headers.getlist("host"), headers.getlist("origin"))
            if refusal is not None:
                logger.warning("Refused %s %s: %s", scope["type"], scope["path"], refusal)
                await _refuse(refusal, scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _refuse(detail: str, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await JSONResponse(status_code=403, content={"detail": detail})(scope, receive, send)
    else:  # closing before accepting: the server answers the handshake with 403
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
