"""Socket.IO events, broadcast to every connected UI, in the order they were emitted.

The events and their payloads are defined in ``socket_events``. Diffusers work runs in worker
threads, so ``emit`` is thread-safe and never blocks: it puts
the event on a queue that one task on the event loop drains. One consumer keeps the order.

Listeners (``add_listener``) see each event synchronously, in the emitting thread, before it
is queued: in-process observers such as tests use them to wait for, or to pause at, a known
point of the work (a denoising step, a download's last state) instead of guessing with sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import socketio

from app.platform.socket_events import SocketEvent

logger = logging.getLogger(__name__)

Payload = dict[str, Any]
Listener = Callable[[str, Payload], None]


class EventEmitter:
    def __init__(self, sio: socketio.AsyncServer) -> None:
        self.sio = sio
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[str, Payload] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event, payload)`` for every event from now on; returns a function
        that removes it. A listener that raises is logged and does not stop the event."""
        self._listeners = [*self._listeners, listener]

        def remove() -> None:
            self._listeners = [other for other in self._listeners if other is not listener]

        return remove

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._drain(), name="socketio-emitter")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self._loop = None

    def emit(self, socket_event: SocketEvent) -> None:
        """Queue ``socket_event`` for every client; callable from any thread."""
        event, payload = socket_event.name, socket_event.payload()
        for listener in self._listeners:
            try:
                listener(event, payload)
            except Exception:
                logger.exception("A listener of %s failed", event)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        item = (event, payload)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._queue.put_nowait(item)
        else:
            loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def _drain(self) -> None:
        while (item := await self._queue.get()) is not None:
            event, payload = item
            try:
                await self.sio.emit(event, payload)
            except Exception:  # a client that vanished must not stop the stream
                logger.exception("Could not emit %s", event)
