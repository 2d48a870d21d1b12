"""The hashes users meet for a LoRA on CivitAI and in A1111 infotexts.

* ``sha256``: of the whole file. CivitAI lists it as "SHA256" and searches by it.
* AutoV2: the first 10 hex digits of ``sha256`` (CivitAI's short form; A1111 writes the same
  prefix for checkpoints as ``Model hash``).
* ``tensor_sha256``: of the data section only, bytes ``8 + header_length`` to the end. It is
  kohya-ss's "addnet" hash (``addnet_hash_safetensors`` in sd-scripts and in A1111's
  ``modules/hashes.py``; sd-scripts stores it as ``sshs_model_hash``). It does not change when
  only the metadata is edited.
* AutoV3: its first 12 hex digits. A1111's ``Lora hashes`` infotext field is exactly this
  (``extensions-builtin/Lora/network.py``: ``NetworkOnDisk.set_hash`` keeps ``hash[0:12]`` of
  ``sha256(..., use_addnet_hash=True)`` for .safetensors files), and CivitAI resolves it.

The payload hash is computed while the upload is copied (:class:`PayloadHasher`): measured on
a 200 MB file, a second sha256 during the copy cost 0.13 s, a second pass over the fresh copy
0.13-0.19 s, so the copy does both and never reads the file twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

AUTOV2_LENGTH = 10
AUTOV3_LENGTH = 12
_LENGTH_BYTES = 8
_CHUNK = 1024 * 1024


def autov2(sha256: str) -> str:
    return sha256[:AUTOV2_LENGTH]


def autov3(tensor_sha256: str | None) -> str | None:
    return tensor_sha256[:AUTOV3_LENGTH] if tensor_sha256 else None


class PayloadHasher:
    """sha256 of a safetensors file's data section, fed the whole file in order, in chunks
    of any size. The header length comes from the first 8 bytes."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._prefix = bytearray()
        self._skip: int | None = None

    def update(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        if self._skip is None:
            needed = _LENGTH_BYTES - len(self._prefix)
            self._prefix += view[:needed]
            view = view[needed:]
            if len(self._prefix) < _LENGTH_BYTES:
                return
            self._skip = int.from_bytes(self._prefix, "little")
        if self._skip:
            dropped = min(self._skip, len(view))
            view = view[dropped:]
            self._skip -= dropped
        if len(view):
            self._digest.update(view)

    def hexdigest(self) -> str | None:
        """None when the file ended before its header did (the file is invalid anyway)."""
        if self._skip is None or self._skip > 0:
            return None
        return self._digest.hexdigest()


def tensor_sha256_of(path: Path) -> str | None:
    """The payload hash of a file on disk (for records made before it was stored)."""
    hasher = PayloadHasher()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
