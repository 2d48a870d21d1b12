"""A download's temporary file in ``<cache>/loras``, hashed while it grows.

Its name starts with ``file_manager.TEMP_PREFIX``, so a crash leaves nothing that start-up
does not remove. The methods block (disk I/O, hashing): call them through
:func:`app.platform.worker_threads.in_thread`, which never lets a cancellation overtake a
write in progress.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from app.cores.lora_files.hashes import PayloadHasher
from app.features.loras.file_manager import LORA_EXTENSION, TEMP_PREFIX


@dataclass(frozen=True)
class Written:
    path: Path
    sha256: str
    tensor_sha256: str | None
    size: int


class PartialFile:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=LORA_EXTENSION)
        self.path = Path(name)
        self._fd: int | None = fd
        self._digest = hashlib.sha256()
        self._payload = PayloadHasher()
        self.size = 0

    def _open_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError("the partial file is closed")
        return self._fd

    def append(self, data: bytes) -> None:
        fd = self._open_fd()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        self._digest.update(data)
        self._payload.update(data)
        self.size += len(data)

    def restart(self) -> None:
        """Empty it: the server cannot resume, the download starts over."""
        fd = self._open_fd()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        self._digest = hashlib.sha256()
        self._payload = PayloadHasher()
        self.size = 0

    def finish(self) -> Written:
        fd = self._open_fd()
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
            self._fd = None
        return Written(self.path, self._digest.hexdigest(), self._payload.hexdigest(), self.size)

    def discard(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)
