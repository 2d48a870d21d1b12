"""The user's own model file on disk, for an import: checking the path (regular file or
diffusers folder, no pickles, a bounded safetensors header of a complete model), its content
hash (read in chunks, remembered by path, size and mtime so a big file is read once) and the
copy into ``<cache>/models`` when asked for (temporary name, fsync, rename, progress events).
The user's file is only ever opened for reading."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from sqlalchemy.ext.asyncio import AsyncSession

from app.cores.lora_files.safetensors_file import SafetensorsError
from app.cores.model_manager.checkpoint_files import (
    CheckpointInfo,
    CheckpointRefused,
    inspect_checkpoint,
)
from app.cores.model_manager.model_family import ModelFamily
from app.cores.model_manager.model_hash import remember_file_sha256, weight_files
from app.cores.model_manager.single_file import (
    ConfigFolderError,
    config_folder_family,
)
from app.database import crud
from app.exceptions import BadRequestError, ConflictError
from app.platform.events import EventEmitter
from app.platform.socket_events import DownloadStepProgress
from app.platform.storage import Storage
from app.validation import user_path

logger = logging.getLogger(__name__)

F = ModelFamily
CHECKPOINT_EXTENSION = ".safetensors"
PICKLE_EXTENSIONS = frozenset({".ckpt", ".pt", ".bin", ".pth", ".pkl"})
IMPORT_PREFIX = ".import-"
"""A copy under way in ``<cache>/models``; one left by a crash is removed at the next start."""
_CHUNK = 4 * 1024 * 1024
_PROGRESS_INTERVAL = 0.5


class ImportRefused(BadRequestError):
    """The path cannot be imported as a model (400; says why)."""


# ---------------------------------------------------------------------------------------------
# Checking the user's path


def _user_path(text: str) -> Path:
    try:
        return user_path(text)
    except ValueError as error:
        raise ImportRefused(str(error)) from None


def pickle_refusal(name: str) -> str | None:
    """The LoRA upload's explanation for a pickle-based file, for a model."""
    suffix = Path(name).suffix.lower()
    if suffix not in PICKLE_EXTENSIONS:
        return None
    return (
        f"'{name}' is a pickle-based file ({suffix}). Only .safetensors model files are "
        "accepted, because pickle files can run arbitrary code when loaded; convert it to "
        ".safetensors first."
    )


@dataclass(frozen=True)
class _Checked:
    path: Path
    is_folder: bool
    family: ModelFamily
    variant: str | None
    evidence: str
    size: int
    info: CheckpointInfo | None = None


def _check_folder(path: Path) -> _Checked:
    if not (path / "model_index.json").is_file():
        raise ImportRefused(
            f"'{path}' is a folder without model_index.json: not a diffusers model folder. "
            "Import a diffusers folder or a single .safetensors checkpoint file."
        )
    try:
        family, variant = config_folder_family(path)
    except ConfigFolderError as error:
        raise ImportRefused(str(error)) from None
    if not weight_files(path):
        raise ImportRefused(
            f"'{path}' has no denoiser weights (unet/ or transformer/ "
            "diffusion_pytorch_model*.safetensors): it is not a complete diffusers model."
        )
    size = sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())
    evidence = f"diffusers folder of {family.display_name}" + (f" ({variant})" if variant else "")
    return _Checked(path, True, family, variant, evidence, size)


def _check_file(path: Path, info_stat: os.stat_result) -> _Checked:
    refusal = pickle_refusal(path.name)
    if refusal is not None:
        raise ImportRefused(refusal)
    if path.suffix.lower() != CHECKPOINT_EXTENSION:
        raise ImportRefused(
            f"'{path.name}' is not a .safetensors file: import a single-file .safetensors "
            "checkpoint or a diffusers folder (with model_index.json)."
        )
    if info_stat.st_size == 0:
        raise ImportRefused(f"File is empty: '{path.name}'")
    if not os.access(path, os.R_OK):
        raise ImportRefused(f"Cannot read '{path}': permission denied.")
    try:
        info = inspect_checkpoint(path)
    except CheckpointRefused as error:
        raise ImportRefused(error.detail) from None
    except SafetensorsError as error:
        raise ImportRefused(str(error)) from None
    except OSError as error:
        raise ImportRefused(f"Cannot read '{path}': {error.strerror or error}.") from None
    return _Checked(path, False, info.family, info.variant, info.evidence, info_stat.st_size, info)


def check_path(text: str) -> _Checked:
    """Everything that reads only headers and configs (blocking: run in a thread)."""
    path = _user_path(text)
    try:
        info_stat = path.stat()
    except FileNotFoundError:
        raise ImportRefused(f"File does not exist: {text}") from None
    except OSError as error:
        raise ImportRefused(f"Cannot access {text}: {error.strerror}") from None
    if stat.S_ISDIR(info_stat.st_mode):
        return _check_folder(path)
    if not stat.S_ISREG(info_stat.st_mode):
        raise ImportRefused(f"Path is not a file or a folder: {text}")
    return _check_file(path, info_stat)


# ---------------------------------------------------------------------------------------------
# Content hashes, remembered by (path, size, mtime)


def _sha256_of(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if on_bytes is not None:
                on_bytes(done)
    return digest.hexdigest()


async def file_sha256(session: AsyncSession, path: Path) -> str:
    """The sha256 of the file at ``path``, from the cache when its size and mtime match."""
    resolved = await anyio.to_thread.run_sync(path.resolve)
    info = await anyio.to_thread.run_sync(resolved.stat)
    key = str(resolved)
    cached = await crud.cached_file_hash(session, key, info.st_size, info.st_mtime_ns)
    if cached is None:
        cached = await anyio.to_thread.run_sync(_sha256_of, resolved)
        await crud.remember_file_hash(session, key, info.st_size, info.st_mtime_ns, cached)
    remember_file_sha256(resolved, info.st_size, info.st_mtime_ns, cached)
    return cached


async def content_sha256(session: AsyncSession, checked: _Checked) -> str:
    if not checked.is_folder:
        return await file_sha256(session, checked.path)
    files = await anyio.to_thread.run_sync(weight_files, checked.path)
    parts = [
        f"{file.relative_to(checked.path).as_posix()}:{await file_sha256(session, file)}"
        for file in files
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Copying into <cache>/models


class CopyProgress:
    def __init__(self, events: EventEmitter, model_id: str, name: str, total: int) -> None:
        self.events, self.model_id, self.name, self.total = events, model_id, name, total
        self._at = 0.0

    def emit(self, phase: str, done: int, step: int = 0) -> None:
        self._at = time.monotonic()
        self.events.emit(
            DownloadStepProgress(
                model_id=self.model_id,
                step=step,
                total=1,
                downloaded_size=done,
                total_downloaded_size=self.total,
                phase=phase,  # type: ignore[arg-type]  # one of the contract's phases
                current_file=None if phase == "complete" else self.name,
            )
        )

    def received(self, done: int) -> None:
        if time.monotonic() - self._at >= _PROGRESS_INTERVAL:
            self.emit("chunk", done)


def _copy_file(source: Path, target: Path, progress: CopyProgress) -> str:
    """Copy ``source`` to ``target`` (a new file), fsynced; the sha256 of what was copied."""
    digest = hashlib.sha256()
    done = 0
    with source.open("rb") as reader, target.open("xb") as writer:
        while chunk := reader.read(_CHUNK):
            writer.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            progress.received(done)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_in(checked: _Checked, final: Path, progress: CopyProgress, sha256: str) -> None:
    """Copy the import to ``final`` through a temporary name; nothing is left on failure."""
    temp = final.with_name(f"{IMPORT_PREFIX}{uuid.uuid4().hex}")
    try:
        progress.emit("init", 0)
        progress.emit("file_start", 0)
        if checked.is_folder:
            done = 0

            def copy_counted(src: str, dst: str) -> object:
                nonlocal done
                copied = shutil.copy2(src, dst)
                with open(dst, "rb+") as handle:
                    os.fsync(handle.fileno())
                done += Path(dst).stat().st_size
                progress.received(done)
                return copied

            shutil.copytree(checked.path, temp, copy_function=copy_counted)
        else:
            copied = _copy_file(checked.path, temp, progress)
            if copied != sha256:
                raise ImportRefused(
                    f"'{checked.path.name}' changed while it was copied; import it again."
                )
        if final.exists():
            raise ConflictError(f"'{final.name}' already exists in the models folder.")
        temp.rename(final)
        _fsync_folder(final.parent)
    except BaseException:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        raise
    progress.emit("file_complete", checked.size, step=1)
    progress.emit("complete", checked.size, step=1)


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def copy_target(storage: Storage, model_id: str, is_folder: bool) -> Path:
    folder = storage.model_dir_for(model_id)
    name = folder.name.replace("..", "_").lstrip(".") or "model"
    folder = folder.with_name(name)
    return folder if is_folder else folder.with_name(name + CHECKPOINT_EXTENSION)
