"""The one test harness: a running app, a client through the full ASGI stack, and waiting on
a condition with a bound (never a fixed sleep: the machine running the tests may be busy)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import socketio
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app

WAIT_TIMEOUT = 60.0
"""How long a condition may take before the test fails: generous, since it only matters
when something is broken, and a loaded machine can be many times slower than an idle one."""


@asynccontextmanager
async def http_client(
    app: FastAPI, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """HTTP through the full ASGI stack (Socket.IO wrapper, middleware, routes).

    ``raise_app_exceptions=False`` lets an unhandled server error arrive as the response a
    real client gets, instead of being raised into the test.
    """
    transport = httpx.ASGITransport(
        app=socketio.ASGIApp(app.state.sio, other_asgi_app=app),
        raise_app_exceptions=raise_app_exceptions,
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


@asynccontextmanager
async def running_app(
    settings: Settings, *, raise_app_exceptions: bool = True
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A fresh app on ``settings`` (lifespan run: migrations, start-up repair) and a client."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        http_client(app, raise_app_exceptions=raise_app_exceptions) as client,
    ):
        yield app, client


async def wait_until(
    condition: Callable[[], bool], timeout: float = WAIT_TIMEOUT, what: str = "condition"
) -> None:
    """Let the event loop run until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.002)


def wait_until_sync(
    condition: Callable[[], bool], timeout: float = WAIT_TIMEOUT, what: str = "condition"
) -> None:
    """``wait_until`` for a test thread that is not on an event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.005)
