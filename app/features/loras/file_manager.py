"""LoRA files on disk: checking the user's path, copying it in safely, cleaning up.

The user's original is only ever opened for reading. The copy goes to a temporary file in
``<cache>/loras`` (hashed while copying: the whole file and its tensor payload, see
``hashes``; size-limited while copying, fsynced) and is validated and described there
(``metadata``), so what is checked is exactly what is kept; it only gets its final name
once it is complete. A crash at any moment leaves a complete file or a temporary one, and
temporary files are removed at the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.cores.lora_files.hashes import PayloadHasher, tensor_sha256_of
from app.cores.lora_files.inspection import inspect_lora_header
from app.cores.lora_files.inspection_types import InvalidLoRAError, LoRAInspection
from app.cores.lora_files.metadata import describe_lora
from app.cores.lora_files.safetensors_file import SafetensorsError, SafetensorsHeader, read_header
from app.database.models import LoRAFacts
from app.exceptions import BadRequestError
from app.platform.disk_space import disk_full_error, is_disk_full
from app.validation import user_path

logger = logging.getLogger(__name__)

LORA_EXTENSION = ".safetensors"
TEMP_PREFIX = ".tmp-"
IN_USE_PREFIX = ".inuse-"
_CHUNK = 1024 * 1024
_PICKLE_EXTENSIONS = {".ckpt", ".pt", ".bin", ".pth", ".pkl"}
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^\w.\- ()\[\]]+")


class LoRAFileError(BadRequestError):
    """The file the user chose cannot be used as a LoRA (400, says why and which file)."""


@dataclass(frozen=True)
class StagedLoRA:
    """A validated copy waiting for its final name."""

    temp_path: Path
    sha256: str
    size: int
    inspection: LoRAInspection
    facts: LoRAFacts


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f}MB"


def check_source(file_path: str, max_size: int) -> Path:
    """The checks that need no reading: existence, kind, extension, size."""
    path = _user_path(file_path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise LoRAFileError(f"File does not exist: {file_path}") from None
    except OSError as error:
        raise LoRAFileError(f"Cannot access {file_path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise LoRAFileError(f"Path is not a file ({kind}): {file_path}")
    check_name(path.name)
    if info.st_size == 0:
        raise LoRAFileError(f"File is empty: '{path.name}'")
    if info.st_size > max_size:
        raise LoRAFileError(size_limit_message(path.name, max_size, info.st_size))
    return path


def _user_path(file_path: str) -> Path:
    """The path the user typed, with ``~`` expanded; refused when no file can have it."""
    try:
        return user_path(file_path)
    except ValueError as error:
        raise LoRAFileError(str(error)) from None


def check_name(file_name: str, *, pickle_only: bool = False) -> None:
    """Refuse pickle-based files by name (and, unless ``pickle_only``, any name that does not
    end in .safetensors)."""
    suffix = Path(file_name).suffix.lower()
    if suffix in _PICKLE_EXTENSIONS:
        raise LoRAFileError(
            f"'{file_name}' is a pickle-based file ({suffix}). Only .safetensors LoRA files are "
            "accepted, because pickle files can run arbitrary code when loaded; convert it "
            "to .safetensors first."
        )
    if suffix != LORA_EXTENSION and not pickle_only:
        raise LoRAFileError(f"File must be a .safetensors file: '{file_name}'")


def size_limit_message(file_name: str, max_size: int, size: int | None = None) -> str:
    """``size``: when known before reading; else the file outgrew the limit while read."""
    if size is None:
        return f"File '{file_name}' exceeds limit ({_mb(max_size)})"
    return f"File size ({_mb(size)}) of '{file_name}' exceeds limit ({_mb(max_size)})"


@contextlib.contextmanager
def _open_regular_file(path: Path) -> Iterator[int]:
    # O_NONBLOCK: a FIFO swapped in after the stat check must not hang the request.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LoRAFileError(f"Path is not a file: {path}")
        yield fd
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Copied:
    sha256: str
    tensor_sha256: str | None
    size: int


def _copy_hashing(source: Path, target_fd: int, max_size: int) -> _Copied:
    digest = hashlib.sha256()
    payload = PayloadHasher()
    copied = 0
    with _open_regular_file(source) as source_fd:
        while chunk := os.read(source_fd, _CHUNK):
            copied += len(chunk)
            if copied > max_size:  # the file grew after the size check
                raise LoRAFileError(size_limit_message(source.name, max_size))
            digest.update(chunk)
            payload.update(chunk)
            os.write(target_fd, chunk)
    os.fsync(target_fd)
    if copied == 0:
        raise LoRAFileError(f"File is empty: '{source.name}'")
    return _Copied(digest.hexdigest(), payload.hexdigest(), copied)


def _validate_copy(copy: Path, display: str) -> tuple[SafetensorsHeader, LoRAInspection]:
    try:
        header = read_header(copy)
    except SafetensorsError as error:
        # read_header names the file it read, the temporary copy; the user knows theirs. Its
        # messages start with that name and say what is wrong.
        reason = str(error).replace(f"'{copy.name}'", f"'{display}'")
        if f"'{display}'" not in reason:
            reason = f"'{display}' is not a valid safetensors file: {reason}"
        raise LoRAFileError(reason) from None
    try:
        return header, inspect_lora_header(header)
    except InvalidLoRAError as error:
        raise LoRAFileError(f"'{display}' cannot be used as a LoRA: {error}") from None


def stage_copy(source: Path, loras_dir: Path, max_size: int) -> StagedLoRA:
    """Copy ``source`` into ``loras_dir`` under a temporary name and validate the copy."""
    loras_dir.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=loras_dir, prefix=TEMP_PREFIX, suffix=LORA_EXTENSION)
    temp_path = Path(temp_name)
    try:
        try:
            copied = _copy_hashing(source, fd, max_size)
        finally:
            os.close(fd)
    except OSError as error:
        temp_path.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full_error(f"the copy of '{source.name}'", loras_dir) from None
        raise LoRAFileError(f"Could not copy '{source.name}': {error.strerror}") from None
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return validate_staged(temp_path, source.name, copied.sha256, copied.tensor_sha256, copied.size)


def validate_staged(
    temp_path: Path,
    display: str,
    sha256: str,
    tensor_sha256: str | None,
    size: int,
    *,
    trained_words: Sequence[str] = (),
) -> StagedLoRA:
    """Validate and describe a complete temporary file in the LoRA folder (a copy or a
    download, hashed while written); messages name ``display``. Removed when refused.
    ``trained_words``: the source's trigger words, for a file that names none."""
    try:
        if size == 0:
            raise LoRAFileError(f"File is empty: '{display}'")
        header, inspection = _validate_copy(temp_path, display)
        facts = describe_lora(
            temp_path, header, inspection, tensor_sha256, trained_words=trained_words
        )
    except OSError as error:
        temp_path.unlink(missing_ok=True)
        raise LoRAFileError(f"Could not read '{display}': {error.strerror}") from None
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return StagedLoRA(
        temp_path=temp_path, sha256=sha256, size=size, inspection=inspection, facts=facts
    )


def describe_stored(path: Path) -> LoRAFacts | None:
    """Facts for a stored copy that has none yet (added before they were kept); None when
    the file is gone or no longer passes validation."""
    try:
        header = read_header(path)
        inspection = inspect_lora_header(header)
        return describe_lora(path, header, inspection, tensor_sha256_of(path))
    except (SafetensorsError, InvalidLoRAError, OSError) as error:
        logger.warning("Cannot describe LoRA file %s: %s", path.name, error)
        return None


def safe_stem(file_name: str) -> str:
    """A file-system-safe stem from the user's file name (the display name keeps the original)."""
    stem = Path(file_name).stem
    cleaned = _UNSAFE_NAME_CHARACTERS.sub("_", stem).strip(" .") or "lora"
    return cleaned[:120]


def place(staged: StagedLoRA, loras_dir: Path, stem: str) -> Path:
    """Give the staged copy its final name: ``stem.safetensors``, else ``stem_2``, ``stem_3``..."""
    for attempt in range(1, 10_000):
        suffix = "" if attempt == 1 else f"_{attempt}"
        target = loras_dir / f"{stem}{suffix}{LORA_EXTENSION}"
        try:
            os.link(staged.temp_path, target)  # fails if the name is taken: never clobbers
        except FileExistsError:
            continue
        except OSError:  # file systems without hard links
            if target.exists():
                continue
            os.replace(staged.temp_path, target)
            return target
        staged.temp_path.unlink()
        return target
    raise LoRAFileError(f"Too many LoRA files named '{stem}'")


def discard(path: Path) -> None:
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def pinned_copies(loras_dir: Path, files: Iterable[Path]) -> Iterator[list[Path]]:
    """Hard links to ``files`` that outlive a delete of the originals during a generation."""
    folder = loras_dir / f"{IN_USE_PREFIX}{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    try:
        pinned = []
        for index, source in enumerate(files):
            target = folder / f"{index}{LORA_EXTENSION}"
            try:
                os.link(source, target)
            except FileNotFoundError:
                raise
            except OSError:
                shutil.copyfile(source, target)
            pinned.append(target)
        yield pinned
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphans(loras_dir: Path, known_files: set[Path]) -> list[Path]:
    """Delete temporary files, pinned copies and files no row points to; return them."""
    if not loras_dir.is_dir():
        return []
    known = {path.resolve() for path in known_files}
    removed = []
    for entry in loras_dir.iterdir():
        if entry.name.startswith(IN_USE_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif entry.is_file() and entry.resolve() not in known:
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
