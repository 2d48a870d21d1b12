"""Refused LoRA uploads (path checks, size limits, bad content) leave nothing behind."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import pytest

from app.config import MiB, Settings
from tests.api import upload_ok
from tests.app.features.loras.helpers import UserFiles, assert_refused
from tests.factories import lora_files
from tests.harness import SmallDisk, running_app

# ---------------------------------------------------------------------------------------------
# Refused uploads: checks on the path


async def test_missing_path_is_refused(
    client: httpx.AsyncClient, settings: Settings, user_dir: Path
) -> None:
    missing = user_dir / "nowhere" / "style.safetensors"
    await assert_refused(client, settings, missing, "does not exist", names=str(missing))


async def test_directory_is_refused(
    client: httpx.AsyncClient, settings: Settings, user_dir: Path
) -> None:
    folder = user_dir / "looks-like.safetensors"
    folder.mkdir()
    await assert_refused(client, settings, folder, "not a file", "directory", names=str(folder))


async def test_device_is_refused(client: httpx.AsyncClient, settings: Settings) -> None:
    await assert_refused(client, settings, "/dev/null", "not a regular file", names="/dev/null")


async def test_fifo_is_refused_without_blocking(
    client: httpx.AsyncClient, settings: Settings, user_dir: Path
) -> None:
    fifo = user_dir / "pipe.safetensors"
    os.mkfifo(fifo)

    released: list[bool] = []

    def release_reader() -> None:
        # If the server opened the FIFO and waits for a writer, give it one (then EOF), so a
        # regression fails this test instead of hanging the whole run.
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody is reading it
            return
        released.append(True)
        os.close(fd)

    watchdog = threading.Timer(10, release_reader)
    watchdog.start()
    try:
        await assert_refused(client, settings, fifo, "not a regular file", names=str(fifo))
    finally:
        watchdog.cancel()
    assert released == [], "the server opened the FIFO and waited for a writer"


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
async def test_pickle_extensions_are_refused_with_the_reason(
    client: httpx.AsyncClient, settings: Settings, user_dir: Path, suffix: str
) -> None:
    checkpoint = lora_files.write_pickle_renamed(user_dir / f"style{suffix}")
    await assert_refused(
        client, settings, checkpoint, suffix, "only .safetensors", "pickle", "arbitrary code"
    )


async def test_other_extension_is_refused(
    client: httpx.AsyncClient, settings: Settings, user_files: UserFiles
) -> None:
    notes = user_files("kohya_unet", "style.txt")  # valid LoRA bytes, wrong name
    await assert_refused(client, settings, notes, "must be a .safetensors file")


async def test_empty_file_is_refused(
    client: httpx.AsyncClient, settings: Settings, user_dir: Path
) -> None:
    empty = lora_files.write_empty(user_dir / "empty.safetensors")
    await assert_refused(client, settings, empty, "empty")


async def test_file_over_the_default_limit_is_refused_before_reading(
    client: httpx.AsyncClient, settings: Settings, user_dir: Path
) -> None:
    assert settings.lora_max_file_size == 500 * MiB
    huge = user_dir / "huge.safetensors"
    with huge.open("wb") as handle:  # sparse: costs no disk and no time
        handle.truncate(500 * MiB + 1)
    await assert_refused(client, settings, huge, "exceeds limit", "500.0MB")


@pytest.mark.parametrize(("over_by", "accepted"), [(1, False), (0, True)])
async def test_configured_size_limit(
    settings: Settings,
    user_files: UserFiles,
    over_by: int,
    accepted: bool,
) -> None:
    source = user_files("kohya_unet", "limit.safetensors")
    size = source.stat().st_size
    small = settings.model_copy(update={"lora_max_file_size": size - over_by})
    async with running_app(small) as (_, client):
        if accepted:
            assert (await upload_ok(client, source))["file_size"] == size
        else:
            await assert_refused(client, small, source, "exceeds limit")


async def test_a_full_disk_is_a_507_and_keeps_nothing(
    small_disk_settings: tuple[Settings, SmallDisk], user_files: UserFiles
) -> None:
    settings, disk = small_disk_settings
    source = user_files("kohya_unet", "style.safetensors")
    async with running_app(settings) as (_, client):
        disk.fill()
        await assert_refused(client, settings, source, "the disk is full", status=507)
        disk.free()
        assert (await upload_ok(client, source))["file_size"] == source.stat().st_size


# ---------------------------------------------------------------------------------------------
# Refused uploads: checks on the content


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        pytest.param("truncated", ("truncated or corrupt",), id="truncated"),
        pytest.param(
            "truncated_header",
            ("not a valid safetensors file", "truncated"),
            id="truncated-header",
        ),
        pytest.param(
            "header_bomb",
            ("not a valid safetensors file", "the header it declares is larger"),
            id="header-bomb",
        ),
        pytest.param("pickle_renamed", ("not a safetensors file", "pickle"), id="pickle-renamed"),
        pytest.param("unrelated", ("no lora weights",), id="unrelated-tensors"),
        pytest.param(
            "full_checkpoint", ("looks like a full model checkpoint",), id="full-checkpoint"
        ),
        pytest.param("down_without_up", ("down/a weight but no up/b",), id="down-without-up"),
    ],
)
async def test_bad_content_is_refused(
    client: httpx.AsyncClient,
    settings: Settings,
    user_files: UserFiles,
    source: str,
    problem: tuple[str, ...],
) -> None:
    path = user_files(source, "my lora.safetensors")
    detail = await assert_refused(client, settings, path, *problem)
    # Only the user's file is named, never the server's temporary copy.
    assert ".tmp-" not in detail


@pytest.mark.parametrize("size", [8 * 1024, 5], ids=["long", "short"])
async def test_a_refusal_tells_nothing_of_the_files_content(
    client: httpx.AsyncClient, settings: Settings, user_dir: Path, size: int
) -> None:
    # Any file can be offered under a .safetensors name (here a symlink to a secret): the
    # refusal says it is not a safetensors file, with no number read from it and no size.
    secret = user_dir / "secret.txt"
    secret.write_bytes((b"TOPSECRET" * 1000)[:size])
    link = user_dir / "x.safetensors"
    link.symlink_to(secret)
    detail = await assert_refused(client, settings, link, "safetensors file")
    as_number = int.from_bytes(b"TOPSECRE", "little")
    for leaked in (str(as_number), f"{as_number:,}", str(size), f"{size:,}", "TOPSECRE"):
        assert leaked not in detail, detail
