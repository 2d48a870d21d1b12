"""Read and bound a safetensors header without trusting the file.

A safetensors file is: an 8-byte little-endian unsigned length ``N``, then ``N`` bytes of
UTF-8 JSON (an object mapping each tensor name to ``{"dtype", "shape", "data_offsets"}``,
plus an optional ``"__metadata__"`` object of strings), then the data buffer.

:func:`read_header` checks all of that before anything else reads the file: it reads at most
``8 + N`` bytes, refuses a declared length larger than the file or than a limit before
allocating anything ("header bombs"), never blocks on a FIFO or device, and applies the same
layout rules as the safetensors library (tensors tile the data buffer exactly, each tensor's
byte size matches its dtype and shape), so a file it accepts is one the library can load.
Every refusal is a :class:`SafetensorsError` whose message an end user can read.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DTYPE_BITS",
    "SafetensorsError",
    "SafetensorsHeader",
    "TensorInfo",
    "read_header",
]

DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors library refuses headers larger than this too."""

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
"""Bits per element of every dtype the safetensors format defines (0.8.0 knows all of these)."""

_METADATA_KEY = "__metadata__"
_LENGTH_BYTES = 8
# No real tensor has more dimensions; a bound keeps a hostile shape cheap to check.
_MAX_DIMS = 64


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file; the message says why, for an end user."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_length: int
    file_size: int
    invalid_metadata_keys: tuple[str, ...] = ()
    """Metadata entries dropped because their value was not a string (``"__metadata__"``
    itself when it was not an object). The safetensors library refuses to load such a file."""

    @property
    def data_start(self) -> int:
        return _LENGTH_BYTES + self.header_length


def read_header(
    path: Path, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Parse and validate the header of the safetensors file at ``path``.

    Reads at most ``8 + N`` bytes and never the tensor data. Raises :class:`SafetensorsError`
    for anything that is not a regular, well-formed safetensors file.
    """
    name = path.name
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SafetensorsError(f"'{name}' does not exist.") from None
    except IsADirectoryError:
        raise SafetensorsError(f"'{name}' is a folder, not a file.") from None
    except PermissionError:
        raise SafetensorsError(f"'{name}' cannot be read (permission denied).") from None
    except OSError as error:
        raise SafetensorsError(f"'{name}' cannot be opened: {error.strerror or error}.") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise SafetensorsError(f"'{name}' is a folder, not a file.")
        if not stat.S_ISREG(info.st_mode):
            raise SafetensorsError(f"'{name}' is not a regular file (a pipe, socket or device?).")
        file_size = info.st_size
        head = _read_exactly(fd, _LENGTH_BYTES, name)
        if len(head) < _LENGTH_BYTES:
            if file_size == 0:
                raise SafetensorsError(f"'{name}' is empty.")
            raise SafetensorsError(f"'{name}' is too short to be a safetensors file.")
        header_length = int.from_bytes(head, "little")
        _check_declared_length(name, head, header_length, file_size, max_header_bytes)
        raw = _read_exactly(fd, header_length, name)
    finally:
        os.close(fd)
    if len(raw) < header_length:
        # The file shrank between fstat and read.
        raise SafetensorsError(f"'{name}' is truncated: its header is incomplete.")
    return _parse_header(name, raw, header_length, file_size)


def _read_exactly(fd: int, count: int, name: str) -> bytes:
    chunks: list[bytes] = []
    remaining = count
    while remaining > 0:
        try:
            chunk = os.read(fd, min(remaining, 1 << 20))
        except BlockingIOError:
            raise SafetensorsError(f"'{name}' is not a regular file.") from None
        except OSError as error:
            raise SafetensorsError(f"'{name}' cannot be read: {error.strerror or error}.") from None
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _check_declared_length(
    name: str, head: bytes, header_length: int, file_size: int, max_header_bytes: int
) -> None:
    if head.startswith(b"PK\x03\x04"):
        raise SafetensorsError(
            f"'{name}' is not a safetensors file: it is a ZIP archive, which is how PyTorch saves "
            ".pt/.ckpt/.bin checkpoints (Python pickle inside). Pickle files can run code when "
            "loaded and are not accepted; use a .safetensors version of this file."
        )
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        raise SafetensorsError(
            f"'{name}' is not a safetensors file: it is a Python pickle (an old-style PyTorch "
            "checkpoint). Pickle files can run code when loaded and are not accepted; use a "
            ".safetensors version of this file."
        )
    if header_length == 0:
        raise SafetensorsError(f"'{name}' is not a valid safetensors file: its header is empty.")
    # The messages below give no number read from the file: any file can be offered under a
    # .safetensors name (a symlink), and its first bytes read as a number would show them.
    if header_length > file_size - _LENGTH_BYTES:
        raise SafetensorsError(
            f"'{name}' is not a valid safetensors file, or is truncated: the header it "
            "declares is larger than the file."
        )
    if header_length > max_header_bytes:
        raise SafetensorsError(
            f"'{name}' is not a usable safetensors file: the header it declares is larger "
            f"than the {max_header_bytes:,} bytes allowed."
        )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _parse_header(name: str, raw: bytes, header_length: int, file_size: int) -> SafetensorsHeader:
    invalid = f"'{name}' is not a valid safetensors file"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SafetensorsError(f"{invalid}: its header is not UTF-8 text.") from None
    try:
        document = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKeyError as error:
        raise SafetensorsError(f"{invalid}: its header names '{error.key}' twice.") from None
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer of 4300+ digits
        raise SafetensorsError(f"{invalid}: its header is not valid JSON.") from None
    if not isinstance(document, dict):
        raise SafetensorsError(f"{invalid}: its header is not a JSON object.")
    if _has_lone_surrogate(document):
        raise SafetensorsError(
            f"{invalid}: its header holds text that is not valid Unicode (an unpaired "
            "surrogate escape such as \\ud800), which the safetensors library refuses."
        )

    metadata: dict[str, str] = {}
    invalid_metadata: list[str] = []
    raw_metadata = document.pop(_METADATA_KEY, None)
    if isinstance(raw_metadata, dict):
        for key, value in raw_metadata.items():
            if isinstance(value, str):
                metadata[key] = value
            else:
                invalid_metadata.append(key)
    elif raw_metadata is not None:
        invalid_metadata.append(_METADATA_KEY)

    if not document:
        raise SafetensorsError(f"'{name}' contains no tensors.")

    data_size = file_size - _LENGTH_BYTES - header_length
    tensors: dict[str, TensorInfo] = {}
    for tensor_name, entry in document.items():
        tensors[tensor_name] = _parse_tensor(name, tensor_name, entry, data_size)
    _check_layout(invalid, tensors, data_size)
    return SafetensorsHeader(
        tensors=tensors,
        metadata=metadata,
        header_length=header_length,
        file_size=file_size,
        invalid_metadata_keys=tuple(invalid_metadata),
    )


def _has_lone_surrogate(document: dict[str, Any]) -> bool:
    """JSON escapes can spell unpaired UTF-16 surrogates; Python accepts them, Rust does not."""
    texts: list[object] = list(document)
    metadata = document.get(_METADATA_KEY)
    if isinstance(metadata, dict):
        texts += [*metadata, *metadata.values()]
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_tensor(name: str, tensor_name: str, entry: object, data_size: int) -> TensorInfo:
    where = f"'{name}' is not a valid safetensors file: tensor '{tensor_name}'"
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{where} has no dtype/shape/offsets description.")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise SafetensorsError(f"{where} has no dtype.")
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise SafetensorsError(f"{where} has an unknown dtype {dtype!r}.")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(_is_int(size) and size >= 0 for size in shape)
    ):
        raise SafetensorsError(f"{where} has an invalid shape.")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(offset) for offset in offsets)
    ):
        raise SafetensorsError(f"{where} has invalid data offsets.")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise SafetensorsError(f"{where} has invalid data offsets ({begin}, {end}).")
    if end > data_size:
        raise SafetensorsError(
            f"'{name}' is truncated or corrupt: tensor '{tensor_name}' "
            f"ends at byte {end:,} of a data section of only {data_size:,} bytes."
        )
    numel = math.prod(shape)
    total_bits = numel * bits
    if total_bits % 8 != 0 or total_bits // 8 != end - begin:
        raise SafetensorsError(
            f"{where} takes {end - begin:,} bytes but a {dtype} tensor of shape "
            f"{tuple(shape)} needs {total_bits / 8:,.0f}."
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), data_offsets=(begin, end))


def _check_layout(invalid: str, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Tensors must tile the data section exactly, as the safetensors library requires."""
    position = 0
    for tensor_name, info in sorted(tensors.items(), key=lambda item: item[1].data_offsets):
        begin, end = info.data_offsets
        if begin != position:
            problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise SafetensorsError(f"{invalid}: tensor '{tensor_name}' {problem}.")
        position = end
    if position != data_size:
        raise SafetensorsError(
            f"{invalid}: {data_size - position:,} bytes after the last tensor belong to none."
        )
