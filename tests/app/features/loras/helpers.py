"""Helpers for the LoRA tests: what ``<cache>/loras`` holds, refused uploads, files as the
user keeps them, and the app's warnings (the HTTP helpers are in ``tests.api``)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from app.config import Settings
from tests.api import list_loras, upload

UserFiles = Callable[..., Path]


def stored_entries(settings: Settings) -> set[str]:
    """Everything in ``<cache>/loras``, hidden temporary files and folders included."""
    folder = settings.loras_dir
    return {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()


@contextmanager
def stored_entries_at(app: FastAPI, settings: Settings, event: str) -> Iterator[list[set[str]]]:
    """What ``<cache>/loras`` holds at each emit of ``event`` inside the block: taken in the
    emitting thread, before any client can hear of the event."""
    seen: list[set[str]] = []

    def look(name: str, _payload: dict[str, Any]) -> None:
        if name == event:
            seen.append(stored_entries(settings))

    remove = app.state.events.add_listener(look)
    try:
        yield seen
    finally:
        remove()


async def assert_refused(
    client: httpx.AsyncClient,
    settings: Settings,
    path: Path | str,
    *problem: str,
    status: int = 400,
    names: str | None = None,
) -> str:
    """Upload ``path``; expect ``status``, a detail naming the file and each ``problem``
    fragment (case-insensitive), and no new file in ``<cache>/loras`` nor new row."""
    entries_before = stored_entries(settings)
    loras_before = await list_loras(client)
    response = await upload(client, path)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    named = names if names is not None else Path(path).name
    assert named in detail, f"{named!r} not named in {detail!r}"
    for fragment in problem:
        assert fragment.lower() in detail.lower(), f"{fragment!r} not in {detail!r}"
    assert stored_entries(settings) == entries_before
    assert not any(name.startswith(".tmp-") for name in stored_entries(settings))
    assert await list_loras(client) == loras_before
    return detail


async def assert_nothing_kept(client: httpx.AsyncClient, settings: Settings) -> None:
    """No file in ``<cache>/loras`` (temporary ones included), no LoRA listed."""
    assert stored_entries(settings) == set()
    assert await list_loras(client) == []


def snapshot(path: Path) -> tuple[bytes, int, int]:
    info = path.stat()
    return path.read_bytes(), info.st_mtime_ns, info.st_ino


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def captured_warnings(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    """Records of ``logger_name`` at WARNING and above (``create_app`` resets the root
    logger's handlers, so pytest's ``caplog`` does not see what the app logs)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
