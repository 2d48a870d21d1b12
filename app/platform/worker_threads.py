"""Blocking file work from async code, safe against cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_thread(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` in a worker thread. If the waiting task is cancelled, the call
    still runs to its end before the cancellation goes on (then the file can be removed)."""
    future = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait([future])
        raise
