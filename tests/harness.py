"""The one test harness: settings with the embedded model, a running app (``running_app``)
and a live server (``live_server``), clients through the full stack, the events the app
emits, real database faults, and waiting on a condition with a bound (never a fixed sleep:
the machine running the tests may be busy)."""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import socketio
import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app, create_asgi_app, serve

WAIT_TIMEOUT = 60.0
"""How long a condition may take before the test fails: generous, since it only matters
when something is broken, and a loaded machine can be many times slower than an idle one."""

Event = tuple[str, dict[str, Any]]
"""An event as the UI receives it: its name and its payload."""


# ---------------------------------------------------------------------------------------------
# Settings, the app, a live server


def settings_with_embedded_model(cache: Path, embedded_model_dir: Path, **fields: Any) -> Settings:
    """Settings on the cache folder ``cache`` with the embedded model pre-copied into it (the
    bytes the server writes); ``fields`` set any other setting."""
    shutil.copytree(embedded_model_dir, cache / "models" / "embedded--tiny-sd")
    return Settings(cache_dir=cache, **fields)


@asynccontextmanager
async def http_client(
    app: FastAPI, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """HTTP through the full ASGI stack (access guard, Socket.IO, middleware, routes).

    ``raise_app_exceptions=False`` lets an unhandled server error arrive as the response a
    real client gets, instead of being raised into the test.
    """
    transport = httpx.ASGITransport(app=serve(app), raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


@asynccontextmanager
async def running_app(
    settings: Settings, *, raise_app_exceptions: bool = True
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A fresh app on ``settings`` (lifespan run: migrations, start-up repair) and a client.
    The ``app``/``client`` fixtures are this on the test's ``settings``; a test calls it
    itself for other settings, a restart, or server errors answered as a browser sees them."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        http_client(app, raise_app_exceptions=raise_app_exceptions) as client,
    ):
        yield app, client


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


# ---------------------------------------------------------------------------------------------
# Waiting on a condition


Described = str | Callable[[], str]
"""What a wait is for, in its failure message; a callable is called then (the last state)."""


class _Deadline:
    def __init__(self, timeout: float, what: Described) -> None:
        self.timeout, self.what = timeout, what
        self.at = time.monotonic() + timeout

    def check(self) -> None:
        if time.monotonic() > self.at:
            what = self.what if isinstance(self.what, str) else self.what()
            raise AssertionError(f"{what} not reached within {self.timeout} s")


async def wait_until(
    condition: Callable[[], bool] | Callable[[], Awaitable[bool]],
    timeout: float = WAIT_TIMEOUT,
    what: Described = "condition",
    interval: float = 0.002,
) -> None:
    """Let the event loop run until ``condition()`` holds (a coroutine function too, say one
    that asks the API); fail after ``timeout`` seconds. ``interval`` only spaces the checks."""
    deadline = _Deadline(timeout, what)
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        deadline.check()
        await asyncio.sleep(interval)


def wait_until_sync(
    condition: Callable[[], bool], timeout: float = WAIT_TIMEOUT, what: Described = "condition"
) -> None:
    """``wait_until`` for a test thread that is not on an event loop."""
    deadline = _Deadline(timeout, what)
    while not condition():
        deadline.check()
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------
# Events: in the process, and over Socket.IO as the UI receives them


@contextmanager
def recorded_events(app: FastAPI) -> Iterator[list[Event]]:
    """Every event the app emits inside the block, in order (the ``emitted`` fixture: the
    whole test)."""
    received: list[Event] = []
    remove = app.state.events.add_listener(lambda name, data: received.append((name, data)))
    try:
        yield received
    finally:
        remove()


def socket_client(**handshake: str) -> socketio.Client:
    """A Socket.IO client that does not reconnect; its websocket handshake carries exactly
    these ``origin``/``host`` values, if any (given as headers, websocket-client would add
    its own Origin as well)."""
    return socketio.Client(reconnection=False, websocket_extra_options=handshake or None)


def connect(client: socketio.Client, url: str) -> None:
    """Connect as the UI does: the websocket transport only."""
    client.connect(url, transports=["websocket"], wait_timeout=WAIT_TIMEOUT)


@contextmanager
def socket_events(url: str) -> Iterator[list[Event]]:
    """Every event the server at ``url`` broadcasts inside the block, in arrival order, as a
    Socket.IO client on the websocket transport receives them."""
    received: list[Event] = []
    client = socket_client()
    client.on("*", lambda name, data: received.append((name, data)))  # every event
    connect(client, url)
    assert client.transport() == "websocket"
    try:
        yield received
    finally:
        client.disconnect()


def wait_for_event(received: list[Event], name: str, start: int = 0, **fields: Any) -> list[Event]:
    """Wait until ``name`` with ``fields`` arrives at ``received[start:]``; those events."""

    def arrived() -> bool:
        return any(
            event == name and all(data.get(k) == v for k, v in fields.items())
            for event, data in received[start:]
        )

    wait_until_sync(arrived, what=f"event {name} {fields or ''}")
    return list(received[start:])


# ---------------------------------------------------------------------------------------------
# Pausing the work at a known point


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


# ---------------------------------------------------------------------------------------------
# Real faults: the database refuses, the disk is full


def database_file(settings: Settings) -> Path:
    """The SQLite file of ``settings``."""
    return Path(settings.resolved_database_url.removeprefix("sqlite+aiosqlite:///"))


def sqlite_refuses(
    settings: Settings, action: Literal["INSERT", "UPDATE", "DELETE"], table: str
) -> Callable[[], None]:
    """A real database fault: from now on SQLite aborts every ``action`` on ``table`` (a
    trigger, seen by every connection, the app's too). Returns a function that lifts it."""
    trigger = f"refuse_{action.lower()}_{table}"
    with sqlite3.connect(database_file(settings)) as connection:
        connection.execute(
            f"CREATE TRIGGER {trigger} BEFORE {action} ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    connection.close()

    def lift() -> None:
        with sqlite3.connect(database_file(settings)) as again:
            again.execute(f"DROP TRIGGER {trigger}")
        again.close()

    return lift


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
