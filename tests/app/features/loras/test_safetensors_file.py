"""read_header: real files, every malformed variant, and hostile files refused cheaply."""

from __future__ import annotations

import json
import os
import struct
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.cores.lora_files.safetensors_file import (
    DTYPE_BITS,
    SafetensorsError,
    SafetensorsHeader,
    TensorInfo,
    read_header,
)
from tests.factories.lora_files import (
    write_empty,
    write_header_bomb,
    write_pickle_renamed,
    write_raw_header,
    write_truncated,
    write_truncated_header,
)
from tests.harness import WAIT_TIMEOUT


def _entry(
    dtype: str = "F32", shape: list[Any] | None = None, begin: int = 0, end: int = 8
) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": [begin, end]}


def _library_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                handle.get_tensor(key)
    except Exception:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Good files


def test_reads_a_real_file_written_by_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "good.safetensors"
    save_file(
        {"a.weight": torch.zeros(4, 3), "b": torch.ones(2, dtype=torch.float16)},
        str(path),
        metadata={"ss_network_dim": "4", "format": "pt"},
    )
    header = read_header(path)
    assert isinstance(header, SafetensorsHeader)
    assert header.metadata == {"ss_network_dim": "4", "format": "pt"}
    assert header.invalid_metadata_keys == ()
    assert header.file_size == path.stat().st_size
    assert header.header_length == struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert set(header.tensors) == {"a.weight", "b"}
    a = header.tensors["a.weight"]
    assert a == TensorInfo(dtype="F32", shape=(4, 3), data_offsets=a.data_offsets)
    assert a.nbytes == 48
    assert a.numel == 12
    assert header.tensors["b"].dtype == "F16"
    assert header.tensors["b"].shape == (2,)


def test_scalar_and_empty_tensors_are_valid(tmp_path: Path) -> None:
    path = tmp_path / "scalars.safetensors"
    save_file({"alpha": torch.tensor(4.0), "nothing": torch.zeros(0, 3)}, str(path))
    header = read_header(path)
    assert header.tensors["alpha"].shape == ()
    assert header.tensors["alpha"].nbytes == 4
    assert header.tensors["nothing"].shape == (0, 3)


def test_every_safetensors_dtype_is_known(tmp_path: Path) -> None:
    # Eight elements of any dtype, sub-byte ones packed (F4: 4 bytes, F6: 6 bytes).
    header: dict[str, object] = {}
    offset = 0
    for index, (dtype, bits) in enumerate(sorted(DTYPE_BITS.items())):
        size = 8 * bits // 8
        header[f"t{index}"] = _entry(dtype, [8], offset, offset + size)
        offset += size
    path = write_raw_header(tmp_path / "dtypes.safetensors", header, b"\0" * offset)
    parsed = read_header(path)
    assert {info.dtype for info in parsed.tensors.values()} == set(DTYPE_BITS)


def test_header_padding_spaces_are_accepted(tmp_path: Path) -> None:
    raw = json.dumps({"a": _entry()}).encode() + b"        "
    path = write_raw_header(tmp_path / "padded.safetensors", raw, b"\0" * 8)
    assert read_header(path).tensors["a"].shape == (2,)


def test_reads_only_the_header_of_a_huge_file(tmp_path: Path) -> None:
    """A 4 GiB (sparse) file: parsing touches the header only, with little memory."""
    size = 1 << 30
    header = json.dumps({"big": _entry("F32", [size], 0, 4 * size)}).encode()
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + 4 * size)
    tracemalloc.start()
    try:
        parsed = read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024  # the 4 GiB of tensor data were never read
    assert parsed.tensors["big"].nbytes == 4 * size


# ---------------------------------------------------------------------------------------------
# Files that are not safetensors at all


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(SafetensorsError, match=r"'e\.safetensors' is empty"):
        read_header(write_empty(tmp_path / "e.safetensors"))


def test_file_shorter_than_the_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x05\x00\x00")
    with pytest.raises(SafetensorsError, match="too short to be a safetensors file"):
        read_header(path)


def test_header_bomb_is_refused_quickly_without_allocating(tmp_path: Path) -> None:
    path = write_header_bomb(tmp_path / "bomb.safetensors")
    tracemalloc.start()
    try:
        with pytest.raises(SafetensorsError, match="the header it declares is larger") as caught:
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # the declared size was never allocated
    # No number read from the file (its first 8 bytes) and not its size either.
    assert "4,611,686,018,427,387,904" not in str(caught.value)
    assert "16 bytes" not in str(caught.value)


def test_header_over_the_limit_is_refused_before_reading_it(tmp_path: Path) -> None:
    """A file that really holds a 2 MiB header: over a 1 MiB limit it is never read."""
    header = json.dumps({"a": _entry()}).encode().ljust(2 * 1024 * 1024, b" ")
    path = write_raw_header(tmp_path / "large-header.safetensors", header, b"\0" * 8)
    tracemalloc.start()
    try:
        with pytest.raises(SafetensorsError, match="larger than the 1,048,576 bytes allowed"):
            read_header(path, max_header_bytes=1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    assert read_header(path).tensors["a"].shape == (2,)  # within the default limit


def test_zero_header_length(tmp_path: Path) -> None:
    path = tmp_path / "zero.safetensors"
    path.write_bytes(b"\0" * 8 + b"{}")
    with pytest.raises(SafetensorsError, match="header is empty"):
        read_header(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_pickle_renamed_to_safetensors(tmp_path: Path, zip_format: bool) -> None:
    path = write_pickle_renamed(tmp_path / "model.safetensors", zip_format=zip_format)
    with pytest.raises(SafetensorsError, match="not a safetensors file") as caught:
        read_header(path)
    message = str(caught.value)
    assert "pickle" in message.lower()
    assert "not accepted" in message


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(bytes(range(7, 250)) * 10)
    with pytest.raises(SafetensorsError, match="the header it declares is larger"):
        read_header(path)


def test_truncated_inside_the_data(tmp_path: Path) -> None:
    source = tmp_path / "source.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.zeros(64)}, str(source))
    path = write_truncated(tmp_path / "cut.safetensors", source)
    with pytest.raises(SafetensorsError, match=r"'cut\.safetensors' is truncated or corrupt"):
        read_header(path)
    assert _library_refuses(path)


def test_truncated_inside_the_header(tmp_path: Path) -> None:
    source = tmp_path / "source.safetensors"
    save_file({"a": torch.zeros(64)}, str(source))
    path = write_truncated_header(tmp_path / "cut.safetensors", source)
    with pytest.raises(SafetensorsError, match="or is truncated"):
        read_header(path)


# ---------------------------------------------------------------------------------------------
# Malformed headers (each also refused by the safetensors library where it gets that far)


@pytest.mark.parametrize(
    ("header", "data", "expected"),
    [
        pytest.param(b"\xff\xfe{}", b"", "not UTF-8", id="not-utf8"),
        pytest.param(b'{"a": ', b"", "not valid JSON", id="not-json"),
        pytest.param(b"[1, 2]", b"", "not a JSON object", id="json-array"),
        pytest.param(b'"text"', b"", "not a JSON object", id="json-string"),
        pytest.param(b'{"a": ' + b"1" * 5000 + b"}", b"", "not valid JSON", id="huge-int"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, b"", "not valid JSON", id="deep-nesting"),
        pytest.param({"a": 1}, b"", "no dtype/shape/offsets", id="entry-not-object"),
        pytest.param({"a": _entry("F33")}, b"\0" * 8, "unknown dtype 'F33'", id="unknown-dtype"),
        pytest.param(
            {"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "no dtype", id="no-dtype"
        ),
        pytest.param({"a": _entry(shape=[-2])}, b"\0" * 8, "invalid shape", id="negative-shape"),
        pytest.param({"a": _entry(shape=[2.0])}, b"\0" * 8, "invalid shape", id="float-shape"),
        pytest.param({"a": _entry(shape=[True, 2])}, b"\0" * 8, "invalid shape", id="bool-shape"),
        pytest.param(
            {"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}},
            b"\0" * 8,
            "invalid shape",
            id="string-shape",
        ),
        pytest.param(
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}},
            b"\0" * 8,
            "invalid data offsets",
            id="float-offsets",
        ),
        pytest.param(
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},
            b"\0" * 8,
            "invalid data offsets",
            id="one-offset",
        ),
        pytest.param(
            {"a": _entry(begin=8, end=0)}, b"\0" * 8, "invalid data offsets", id="end-before-begin"
        ),
        pytest.param(
            {"a": _entry(begin=-8, end=0)}, b"\0" * 8, "invalid data offsets", id="negative-offset"
        ),
        pytest.param({"a": _entry(end=16)}, b"\0" * 8, "truncated or corrupt", id="beyond-data"),
        pytest.param({"a": _entry(shape=[3])}, b"\0" * 8, "needs 12", id="size-mismatch"),
        pytest.param(
            {"a": _entry(begin=0, end=8), "b": _entry(begin=4, end=12)},
            b"\0" * 12,
            "overlaps another tensor",
            id="overlap",
        ),
        pytest.param({"a": _entry(begin=4, end=12)}, b"\0" * 12, "leaves a gap", id="gap"),
        pytest.param(
            {"a": _entry()}, b"\0" * 12, "4 bytes after the last tensor", id="trailing-bytes"
        ),
    ],
)
def test_malformed_header(tmp_path: Path, header: object, data: bytes, expected: str) -> None:
    path = write_raw_header(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=expected) as caught:
        read_header(path)
    assert "'bad.safetensors'" in str(caught.value)
    assert _library_refuses(path)


@pytest.mark.parametrize("header", [{}, {"__metadata__": {"a": "b"}}], ids=["empty", "metadata"])
def test_a_file_without_tensors_is_refused(tmp_path: Path, header: object) -> None:
    # The safetensors library itself accepts these; nothing in them can be a LoRA.
    path = write_raw_header(tmp_path / "none.safetensors", header)
    with pytest.raises(SafetensorsError, match="contains no tensors"):
        read_header(path)


def test_duplicate_tensor_names_are_refused(tmp_path: Path) -> None:
    entry = json.dumps(_entry())
    raw = f'{{"a": {entry}, "a": {entry}}}'
    path = write_raw_header(tmp_path / "dup.safetensors", raw, b"\0" * 8)
    with pytest.raises(SafetensorsError, match="names 'a' twice"):
        read_header(path)


def test_non_string_metadata_is_dropped_not_fatal(tmp_path: Path) -> None:
    header = {
        "a": _entry(),
        "__metadata__": {"good": "yes", "rank": 4, "tags": ["x"], "none": None},
    }
    path = write_raw_header(tmp_path / "meta.safetensors", header, b"\0" * 8)
    parsed = read_header(path)
    assert parsed.metadata == {"good": "yes"}
    assert sorted(parsed.invalid_metadata_keys) == ["none", "rank", "tags"]
    assert _library_refuses(path)  # which is why the LoRA inspector refuses such files


def test_metadata_that_is_not_an_object_is_dropped(tmp_path: Path) -> None:
    path = write_raw_header(
        tmp_path / "meta.safetensors", {"a": _entry(), "__metadata__": ["x"]}, b"\0" * 8
    )
    parsed = read_header(path)
    assert parsed.metadata == {}
    assert parsed.invalid_metadata_keys == ("__metadata__",)
    assert set(parsed.tensors) == {"a"}


# ---------------------------------------------------------------------------------------------
# Things that are not regular files


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "lora.safetensors"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            read_header(fifo)
        except BaseException as error:
            outcome.append(error)
        else:
            outcome.append(None)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=WAIT_TIMEOUT)  # a bound for a hang, not a speed target
    if worker.is_alive():
        # Unblock the stuck reader so the test process can exit, then fail.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_header blocked on a FIFO")
    assert len(outcome) == 1
    assert isinstance(outcome[0], SafetensorsError)
    assert "not a regular file" in str(outcome[0])


def test_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(SafetensorsError, match="is a folder"):
        read_header(folder)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SafetensorsError, match="does not exist"):
        read_header(tmp_path / "missing.safetensors")


def test_symlink_to_a_regular_file_is_followed(tmp_path: Path) -> None:
    target = tmp_path / "real.safetensors"
    save_file({"a": torch.zeros(2)}, str(target))
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    assert set(read_header(link).tensors) == {"a"}
