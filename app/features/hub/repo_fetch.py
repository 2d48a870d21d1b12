"""Fetch the files of a :class:`RepoPlan` into a folder, one after the other.

Each file streams straight to its place in the (temporary) folder, hashed as it arrives;
after a dropped connection it resumes with ``Range`` where the server allows it (the Hub
does), else starts that file over. The sizes and sha256 the Hub listed are checked, so a
truncated or altered file never becomes part of a model. Progress counts bytes that arrived
and never goes backwards (a file that starts over is not counted twice).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.features.hub.file_plan import RepoFile, plain_index
from app.platform.remote_files import (
    RETRYABLE_ERRORS,
    DownloadError,
    RetryableStatus,
    RetryPolicy,
    Target,
    check_status,
    network_error,
    open_stream,
)
from app.platform.transfer_limits import Watchdog
from app.platform.worker_threads import in_thread

FLUSH_BYTES = 1024 * 1024
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$", re.IGNORECASE)

OnBytes = Callable[[int], None]
"""Bytes of the current file so far."""


class _Incomplete(Exception):
    """The body ended before the file's size."""


@dataclass(frozen=True)
class FileSource:
    url: str
    target: Target


class _OpenFile:
    """The file being written, with the hash of what it holds."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.digest = hashlib.sha256()
        self.size = 0

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.digest.update(data)
        self.size += len(data)

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.digest = hashlib.sha256()
        self.size = 0

    def close(self) -> None:
        os.close(self.fd)


class FileFetch:
    """One file of the plan, with retries that resume."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        source: FileSource,
        file: RepoFile,
        folder: Path,
        retry: RetryPolicy,
        watchdog: Watchdog,
        on_bytes: OnBytes,
    ) -> None:
        self.http = http
        self.source = source
        self.file = file
        self.path = folder / file.local_name
        self.retry = retry
        self.watchdog = watchdog
        self.on_bytes = on_bytes
        self.ranges = False

    async def run(self) -> None:
        out = await in_thread(_OpenFile, self.path)
        try:
            await self._attempts(out)
        finally:
            await in_thread(out.close)
        self._check(out)
        if self.file.is_variant_index and self.file.variant is not None:
            data = await in_thread(self.path.read_bytes)
            await in_thread(self.path.write_bytes, plain_index(data, self.file.variant))

    async def _attempts(self, out: _OpenFile) -> None:
        failures = 0
        while True:
            before = out.size
            try:
                await self._attempt(out)
                return
            except (*RETRYABLE_ERRORS, RetryableStatus, _Incomplete) as error:
                failures = 1 if out.size > before else failures + 1
                if failures >= self.retry.attempts:
                    raise network_error(error, self.source.url, failures) from None
                await self.retry.wait(failures)

    async def _attempt(self, out: _OpenFile) -> None:
        resume_from = out.size if self.ranges else 0
        if out.size and not resume_from:
            await in_thread(out.restart)
        headers = {"Accept-Encoding": "identity"}
        if resume_from:
            headers["Range"] = f"bytes={resume_from}-"
        async with open_stream(self.http, self.source.url, self.source.target, headers) as answer:
            if answer.status_code == 416 and resume_from and resume_from == self.file.size:
                return  # it had all arrived when the connection dropped
            check_status(answer, self.source.target, frozenset({200, 206}))
            await self._take_headers(answer, out, resume_from)
            await self._stream(answer, out)
        if self.file.size is not None and out.size < self.file.size:
            raise _Incomplete

    async def _take_headers(self, answer: httpx.Response, out: _OpenFile, resume_from: int) -> None:
        if answer.status_code == 206:
            match = _CONTENT_RANGE.match(answer.headers.get("content-range", "").strip())
            if match is None or int(match.group(1)) != resume_from:
                self.ranges = False  # not the part asked for: that file starts over
                await in_thread(out.restart)
                raise _Incomplete
            self.ranges = True
        else:
            if out.size:
                await in_thread(out.restart)
            self.ranges = answer.headers.get("accept-ranges", "").lower() == "bytes"

    async def _stream(self, answer: httpx.Response, out: _OpenFile) -> None:
        buffer = bytearray()
        expected = self.file.size
        try:
            async for chunk in answer.aiter_raw():
                self.watchdog.received(len(chunk))
                buffer += chunk
                received = out.size + len(buffer)
                if expected is not None and received > expected:
                    raise DownloadError(
                        f"{self.source.target.server(self.source.url)} sent more than the "
                        f"{expected} bytes of {self.file.remote_name}; the download was stopped."
                    )
                if len(buffer) >= FLUSH_BYTES:
                    await in_thread(out.append, bytes(buffer))
                    buffer.clear()
                self.on_bytes(received)
        except RETRYABLE_ERRORS:
            await in_thread(out.append, bytes(buffer))  # keep what arrived: resume
            raise
        await in_thread(out.append, bytes(buffer))

    def _check(self, out: _OpenFile) -> None:
        name = self.file.remote_name
        if self.file.size is not None and out.size != self.file.size:
            raise DownloadError(
                f"{name} arrived with {out.size} bytes instead of {self.file.size}; "
                "the download was stopped. Try again."
            )
        if self.file.sha256 is not None and out.digest.hexdigest() != self.file.sha256:
            raise DownloadError(
                f"{name} arrived damaged (its sha256 differs from the one the Hub lists); "
                "the download was stopped. Try again."
            )
