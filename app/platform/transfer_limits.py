"""Bounds on one transfer that httpx's timeouts cannot give.

httpx's read timeout fires only when *no* byte arrives, and the retries start afresh after
every attempt that made progress, so a server trickling a byte now and then would hold a
download (and one of the parallel slots) forever. Two bounds cover the whole transfer,
connecting, retries and back-off included:

* a stall: less than ``STALL_FLOOR`` bytes in ``stall_timeout`` seconds fails the download
  (no retry: the next attempt would trickle the same way);
* a deadline: the transfer as a whole may take at most ``deadline`` seconds.

One ``asyncio.timeout_at`` watches both; it is moved forward each time the floor is reached, so
nothing polls and the check fires on time even while no byte arrives. Times are the event
loop's clock, which is monotonic.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from app.config import Settings
from app.platform.remote_files import DownloadError

STALL_FLOOR = 64 * 1024
"""Bytes that must arrive in every stall window: 0.5 KiB/s at the default 120 s, which any
working connection exceeds, while a trickle does not."""


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:g} s"


@dataclass(frozen=True)
class Limits:
    stall_timeout: float
    deadline: float
    floor: int = STALL_FLOOR

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.lora_download_stall_timeout, settings.lora_download_deadline)


class Watchdog:
    """Counts the bytes of one transfer and stops it when a limit is passed."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._timeout: asyncio.Timeout | None = None
        self._window_start = 0.0
        self._window_bytes = 0
        self._deadline_at = 0.0

    @asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Run the block under both limits; passing one raises :class:`DownloadError`."""
        now = asyncio.get_running_loop().time()
        self._window_start, self._window_bytes = now, 0
        self._deadline_at = now + self.limits.deadline
        timeout = self._timeout = asyncio.timeout_at(self._expiry())
        try:
            async with timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise  # someone else's timeout
            raise self._error() from None
        finally:
            self._timeout = None

    def received(self, count: int) -> None:
        """``count`` more bytes came from the server (whether or not they are kept)."""
        if self._timeout is None or self._timeout.expired():
            return  # the verdict is in: keep the counts the message reports
        self._window_bytes += count
        if self._window_bytes < self.limits.floor:
            return
        # Enough for this window: the next one starts now.
        self._window_start, self._window_bytes = asyncio.get_running_loop().time(), 0
        self._timeout.reschedule(self._expiry())

    def _expiry(self) -> float:
        return min(self._window_start + self.limits.stall_timeout, self._deadline_at)

    def _error(self) -> DownloadError:
        limits = self.limits
        if self._deadline_at <= self._window_start + limits.stall_timeout:
            return DownloadError(
                f"The download took longer than {_duration(limits.deadline)} "
                f"(LOCALAI_LORA_DOWNLOAD_DEADLINE = {limits.deadline:g} s) and was stopped. "
                "Try again later, or raise that limit."
            )
        count = self._window_bytes
        return DownloadError(
            f"The server sent only {count} byte{'' if count == 1 else 's'} in the last "
            f"{limits.stall_timeout:g} s; the download was stopped. Try again later."
        )
