"""HTTP conventions shared by every route: trailing slashes and error bodies."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.exceptions import AppError
from app.platform.disk_space import disk_full_error, is_disk_full

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


class ErrorDetail(BaseModel):
    """Every handled error: one sentence for the person using the UI."""

    detail: str


def error_response(description: str) -> dict[str, Any]:
    return {"model": ErrorDetail, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error_response("The request cannot be served as asked; `detail` says why."),
    403: error_response("The request's Origin or Host is not allowed (see LOCALAI_ALLOWED_*)."),
    404: error_response("The named thing does not exist."),
    409: error_response("The request clashes with the current state."),
    429: error_response("Too much work is waiting; try again once some of it is done."),
    500: error_response("A bug or an environment fault (logged in full); no internals."),
    507: error_response("The disk is full; nothing of the change was kept."),
}
"""The error answers any route may give, documented once for the whole API."""


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
            if started:  # too late for another answer: the server closes the connection
                logger.error("Error after the response began", exc_info=error)
                raise
            await _answer_unexpected(error, scope, receive, send)


async def _answer_unexpected(error: Exception, scope: Scope, receive: Receive, send: Send) -> None:
    """A full disk wherever it struck (a commit, most often) is the environment, not a bug:
    507 saying so; the request's transaction has already been rolled back. Anything else is
    a 500 without internals, logged in full."""
    if is_disk_full(error):
        logger.warning("Disk full on %s %s: %s", scope["method"], scope["path"], error)
        settings = getattr(scope["app"].state, "settings", None)
        full = disk_full_error("the change", settings.cache_dir if settings else None)
        response = JSONResponse(status_code=full.status_code, content={"detail": full.detail})
    else:
        logger.error("Unexpected error on %s %s", scope["method"], scope["path"], exc_info=error)
        response = JSONResponse(status_code=500, content={"detail": "Internal server error"})
    await response(scope, receive, send)


class StrictJSONRequest(Request):
    """A request whose JSON body is strict JSON: no ``NaN``/``Infinity`` (Python's parser
    accepts them, and the 422 that names them could not be serialised), no lone surrogates
    (not Unicode text: SQLite cannot store them), no nesting deep enough to exhaust the
    stack. Each is refused as FastAPI's ordinary 422 ``json_invalid``."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = parse_strict_json(body)
        return self._json


def parse_strict_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise json.JSONDecodeError("the body is not UTF-8 text", "", error.start) from None

    def refuse_constant(name: str) -> Any:
        raise json.JSONDecodeError(f"{name} is not a JSON number", text, 0)

    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise json.JSONDecodeError("the JSON is nested too deeply", text, 0) from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise json.JSONDecodeError(
            "a string holds a lone surrogate (\\ud800-\\udfff): not Unicode text", text, 0
        ) from None
    return value


class StrictJSONRoute(APIRoute):
    """Every route of the app: bodies parsed by :class:`StrictJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
