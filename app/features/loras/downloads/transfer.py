"""Stream one file into a :class:`PartialFile`.

* The size limit holds while streaming: a declared size over the limit fails before any
  byte is read, and the count of received bytes is checked on every chunk, so a server that
  omits or misstates Content-Length cannot fill the disk.
* After a dropped connection (or a timeout, or 502/503/504) it tries again with
  exponential backoff; it resumes with ``Range: bytes=N-`` when the server advertised
  ``Accept-Ranges: bytes`` or answered 206, otherwise it starts over. Consecutive failures
  without progress are limited by ``RetryPolicy.attempts``.
* Since every attempt that made progress resets that count, the transfer as a whole runs
  under :mod:`limits`: a stall (too few bytes for too long) and a deadline end it for good.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import unquote

import httpx

from app.features.loras import file_manager
from app.features.loras.downloads.partial_file import PartialFile
from app.features.loras.downloads.plan import Plan
from app.platform.remote_files import (
    RETRYABLE_ERRORS,
    DownloadError,
    RetryableStatus,
    RetryPolicy,
    check_status,
    network_error,
    open_stream,
)
from app.platform.transfer_limits import Limits, Watchdog
from app.platform.worker_threads import in_thread

FLUSH_BYTES = 1024 * 1024
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$", re.IGNORECASE)
_FILENAME_STAR = re.compile(r"filename\*\s*=\s*[\w-]+'[^']*'([^;]+)", re.IGNORECASE)
_FILENAME = re.compile(r'filename\s*=\s*(?:"([^"]*)"|([^;]+))', re.IGNORECASE)

OnResponse = Callable[[str, int | None], None]
"""(file name, total bytes or None) once the server answered."""
OnProgress = Callable[[int, int | None], None]
"""(bytes received, total bytes or None) after every chunk."""


class _Incomplete(Exception):
    """The body ended before the size the server announced."""


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _content_range(response: httpx.Response) -> tuple[int, int | None] | None:
    match = _CONTENT_RANGE.match(response.headers.get("content-range", "").strip())
    if match is None:
        return None
    total = match.group(3)
    return int(match.group(1)), (int(total) if total.isdigit() else None)


def _disposition_name(response: httpx.Response) -> str | None:
    header = response.headers.get("content-disposition", "")
    if match := _FILENAME_STAR.search(header):
        raw = unquote(match.group(1).strip().strip('"'))
    elif match := _FILENAME.search(header):
        raw = (match.group(1) or match.group(2) or "").strip()
    else:
        return None
    name = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name or None


class Transfer:
    def __init__(
        self,
        client: httpx.AsyncClient,
        plan: Plan,
        partial: PartialFile,
        *,
        max_size: int,
        retry: RetryPolicy,
        limits: Limits,
        on_response: OnResponse,
        on_progress: OnProgress,
    ) -> None:
        self.client = client
        self.plan = plan
        self.partial = partial
        self.max_size = max_size
        self.retry = retry
        self.watchdog = Watchdog(limits)
        self.on_response = on_response
        self.on_progress = on_progress
        self.file_name = plan.file_name
        self.total: int | None = None
        self.ranges = False
        self._named = False

    async def run(self) -> None:
        async with self.watchdog.watching():
            await self._attempts()

    async def _attempts(self) -> None:
        failures = 0
        while True:
            before = self.partial.size
            try:
                await self._attempt()
                return
            except (*RETRYABLE_ERRORS, RetryableStatus, _Incomplete) as error:
                failures = 1 if self.partial.size > before else failures + 1
                if failures >= self.retry.attempts:
                    raise network_error(error, self.plan.url, failures) from None
                await self.retry.wait(failures)

    async def _attempt(self) -> None:
        resume_from = self.partial.size if self.ranges else 0
        if self.partial.size and not resume_from:
            await in_thread(self.partial.restart)
        headers = {"Accept-Encoding": "identity"}
        if resume_from:
            headers["Range"] = f"bytes={resume_from}-"
        async with open_stream(self.client, self.plan.url, self.plan.target, headers) as response:
            if response.status_code == 416 and resume_from and resume_from == self.total:
                return  # it had all arrived when the connection dropped
            check_status(response, self.plan.target, frozenset({200, 206}))
            await self._take_headers(response, resume_from)
            await self._stream(response)
        if self.total is not None and self.partial.size < self.total:
            raise _Incomplete

    async def _take_headers(self, response: httpx.Response, resume_from: int) -> None:
        if not self._named:
            self._named = True
            name = _disposition_name(response) if self.plan.name_from_response else None
            if name:
                file_manager.check_name(name, pickle_only=True)
                self.file_name = name
        if response.status_code == 206:
            content_range = _content_range(response)
            if content_range is None or content_range[0] != resume_from:
                self.ranges = False  # not the part asked for: start over without ranges
                await in_thread(self.partial.restart)
                raise _Incomplete
            self.ranges = True
            self.total = content_range[1]
        else:  # the whole file: from the start
            if self.partial.size:
                await in_thread(self.partial.restart)
            self.total = _content_length(response)
            self.ranges = response.headers.get("accept-ranges", "").lower() == "bytes"
        if self.total is not None and self.total > self.max_size:
            message = file_manager.size_limit_message(self.file_name, self.max_size, self.total)
            raise DownloadError(message)
        self.on_response(self.file_name, self.total)

    async def _stream(self, response: httpx.Response) -> None:
        buffer = bytearray()
        try:
            async for chunk in response.aiter_raw():
                self.watchdog.received(len(chunk))
                received = self.partial.size + len(buffer) + len(chunk)
                if received > self.max_size:
                    message = file_manager.size_limit_message(self.file_name, self.max_size)
                    raise DownloadError(message)
                buffer += chunk
                if len(buffer) >= FLUSH_BYTES:
                    await in_thread(self.partial.append, bytes(buffer))
                    buffer.clear()
                self.on_progress(received, self.total)
        except RETRYABLE_ERRORS:
            await in_thread(self.partial.append, bytes(buffer))  # keep what arrived: resume
            raise
        await in_thread(self.partial.append, bytes(buffer))
