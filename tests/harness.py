"""The one test harness: a running app, a client through the full ASGI stack, and waiting on
a condition with a bound (never a fixed sleep: the machine running the tests may be busy)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app, create_asgi_app, serve

WAIT_TIMEOUT = 60.0
"""How long a condition may take before the test fails: generous, since it only matters
when something is broken, and a loaded machine can be many times slower than an idle one."""


@asynccontextmanager
async def http_client(
    app: FastAPI, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """HTTP through the full ASGI stack (access guard, Socket.IO, middleware, routes).

    ``raise_app_exceptions=False`` lets an unhandled server error arrive as the response a
    real client gets, instead of being raised into the test.
    """
    transport = httpx.ASGITransport(
        app=serve(app),
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


class PausedWork:
    """A worker thread held at the first emit of an event (see ``paused_at``)."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.released = threading.Event()

    async def wait(self) -> None:
        """Until the worker is held at the event."""
        await wait_until(self.reached.is_set, what="the paused event")

    def release(self) -> None:
        self.released.set()


@asynccontextmanager
async def paused_at(app: FastAPI, event: str) -> AsyncIterator[PausedWork]:
    """Hold the worker thread that first emits ``event`` (say a denoising step) until
    ``release()`` or the end of the block: the work is then certainly in progress, at a known
    point, however fast or slow the machine is. Events emitted on the event loop itself are
    never held (that would stop the loop)."""
    paused = PausedWork()
    loop_thread = threading.get_ident()

    def hold(name: str, _payload: dict[str, Any]) -> None:
        if name != event or threading.get_ident() == loop_thread or paused.reached.is_set():
            return
        paused.reached.set()
        paused.released.wait(WAIT_TIMEOUT)

    remove = app.state.events.add_listener(hold)
    try:
        yield paused
    finally:
        paused.release()
        remove()


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """``create_asgi_app`` served by a real uvicorn in a background thread on a free loopback
    port; yields its base URL. Stops the server (and checks that it stopped) on leaving."""
    # A socket bound to port 0 gets a free port with no race between choosing and binding.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_asgi_app(settings), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_until_sync(lambda: server.started or not thread.is_alive(), what="uvicorn start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT_TIMEOUT)
        listener.close()
    assert not thread.is_alive(), "uvicorn did not stop"


class SmallDisk:
    """A real file system of a few MiB (tmpfs) that a test can fill to the last byte."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._filler = root / "filler"

    def fill(self) -> None:
        """Take every free byte: the next write anywhere on it fails with ENOSPC."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            chunk = 1024 * 1024
            while chunk:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    chunk //= 2
        finally:
            os.close(fd)

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)


@contextmanager
def small_disk(folder: Path, size_mib: int) -> Iterator[SmallDisk]:
    """Mount a ``size_mib`` tmpfs on ``folder``; skips the test where mounting is not
    allowed (it needs root): a full disk cannot be caused any other way without mocks."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system: {mounted.stderr.decode().strip()}")
    try:
        yield SmallDisk(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)
