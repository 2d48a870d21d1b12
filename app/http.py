"""HTTP conventions shared by every route: trailing slashes and error bodies."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.exceptions import AppError

logger = logging.getLogger(__name__)


class TrailingSlashMiddleware:
    """Serve ``/histories`` and ``/histories/`` alike, without redirects.

    The UI calls some paths with a trailing slash and some without; a redirect could turn a
    POST into a GET in some clients, so the slash is simply dropped before routing.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            if len(path) > 1 and path.endswith("/"):
                scope = dict(scope)
                scope["path"] = path.rstrip("/") or "/"
                raw: bytes | None = scope.get("raw_path")
                if raw:
                    scope["raw_path"] = raw.rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


async def app_error_handler(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, AppError)
    return JSONResponse(status_code=error.status_code, content={"detail": error.detail})


class UnexpectedErrorMiddleware:
    """A bug or an environment fault: logged in full, answered with JSON 500 without internals.

    It sits *inside* the CORS middleware, so that a 500 carries the CORS headers and a browser
    sees the status instead of a CORS failure; and it answers instead of re-raising (as
    Starlette's outermost error handler does), so the keep-alive connection stays usable.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as error:
            logger.error(
                "Unexpected error on %s %s", scope["method"], scope["path"], exc_info=error
            )
            if started:  # too late for another answer: the server closes the connection
                raise
            response = JSONResponse(status_code=500, content={"detail": "Internal server error"})
            await response(scope, receive, send)
