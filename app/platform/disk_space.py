"""Recognising a full disk, wherever it surfaces, and saying so in one sentence.

A full disk shows up as ``OSError`` ENOSPC (or EDQUOT, a quota) from file writes, and as
SQLite's ``SQLITE_FULL`` ("database or disk is full") wrapped by SQLAlchemy from a commit.
Writers clean up what they started (atomic files, the request's rollback); this module only
turns the fault into the 507 the user reads.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from app.exceptions import InsufficientStorageError

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(error: BaseException) -> bool:
    """True when ``error``, or an error it was raised from, is a full disk."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if isinstance(current, sqlite3.Error) and current.sqlite_errorcode == sqlite3.SQLITE_FULL:
            return True
        original = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError wraps sqlite3's
        if isinstance(original, BaseException) and is_disk_full(original):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_error(what: str, folder: Path | None = None) -> InsufficientStorageError:
    where = f" on the drive that holds {folder.resolve()}" if folder is not None else ""
    return InsufficientStorageError(
        f"The disk is full: {what} could not be saved, and nothing of it was kept. "
        f"Free some space{where} and try again."
    )
