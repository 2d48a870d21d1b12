"""A short, stable hash of a model for the PNG infotext's ``Model hash``.

A single-file checkpoint gets exactly A1111's: the first 10 hex digits of the sha256 of the
whole file (A1111's ``sha256`` short hash, CivitAI's AutoV2), :func:`file_short_hash`.

A1111 writes ``Model hash: <first 10 hex digits of the checkpoint file's sha256>`` (CivitAI
calls this AutoV2). A diffusers folder has no single checkpoint file, so the hash is taken
over the denoiser's weights (``unet/`` or ``transformer/``), the part that defines the model:
its ``diffusion_pytorch_model*.safetensors`` files (all shards, in name order), or the
``.bin`` files when there are no safetensors. The same folder always gives the same hash;
another UNet gives another.

It is computed once per load, in the load worker, and remembered for the life of the process
by (path, size, modification time), so that loading the same model again costs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

SHORT_HASH_LENGTH = 10
_CHUNK = 1024 * 1024
_DENOISERS = ("unet", "transformer")
_FileKey = tuple[str, int, int]

_lock = threading.Lock()
_cache: dict[tuple[_FileKey, ...], str] = {}
_full_cache: dict[tuple[_FileKey, ...], str] = {}


def weight_files(model_dir: Path) -> list[Path]:
    """The denoiser weight files of a diffusers folder, in hashing order (may be empty)."""
    for component in _DENOISERS:
        folder = model_dir / component
        if not folder.is_dir():
            continue
        for pattern in ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin"):
            files = sorted(path for path in folder.glob(pattern) if path.is_file())
            # A dtype variant ("...fp16.safetensors") is used only when it is all there is.
            plain = [path for path in files if path.name.count(".") == 1]
            if plain or files:
                return plain or files
    return []


def _digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of the whole file, read in chunks; remembered for the life of the process
    by (path, size, modification time). Raises OSError."""
    stat = path.stat()
    key = ((str(path.resolve()), stat.st_size, stat.st_mtime_ns),)
    with _lock:
        cached = _full_cache.get(key)
    if cached is None:
        cached = _digest([path])
        with _lock:
            _full_cache[key] = cached
    return cached


def remember_file_sha256(path: Path, size: int, mtime_ns: int, sha256: str) -> None:
    """Tell :func:`file_sha256` a hash known from elsewhere (the database's cache)."""
    with _lock:
        _full_cache[((str(path.resolve()), size, mtime_ns),)] = sha256


def file_short_hash(path: Path) -> str | None:
    """A1111's ``Model hash`` of a single-file checkpoint: the first 10 hex digits of the
    sha256 of the whole file; None when it cannot be read."""
    try:
        return file_sha256(path)[:SHORT_HASH_LENGTH]
    except OSError as error:
        logger.warning("Cannot hash %s: %s", path, error)
        return None


def model_hash(model_dir: Path) -> str | None:
    """First 10 hex digits of the sha256 of the denoiser weights; None if there are none."""
    files = weight_files(model_dir)
    if not files:
        return None
    try:
        key = tuple(
            (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            for path in files
            for stat in (path.stat(),)
        )
        with _lock:
            cached = _cache.get(key)
        if cached is None:
            cached = _digest(files)[:SHORT_HASH_LENGTH]
            with _lock:
                _cache[key] = cached
    except OSError as error:
        logger.warning("Cannot hash the weights of %s: %s", model_dir, error)
        return None
    return cached
