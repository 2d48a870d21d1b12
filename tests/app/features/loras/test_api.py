"""The LoRA endpoints through real HTTP: accepted uploads, duplicates, list/get/delete, races."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from tests.api import list_loras, upload, upload_ok
from tests.app.features.loras.helpers import (
    UserFiles,
    assert_refused,
    sha256_of,
    snapshot,
    stored_entries,
)
from tests.harness import WAIT_TIMEOUT, database_file, running_app, sqlite_refuses, wait_until

# ---------------------------------------------------------------------------------------------
# Accepted uploads


async def test_upload_copies_the_file_and_leaves_the_original_alone(
    client: httpx.AsyncClient, settings: Settings, user_files: UserFiles
) -> None:
    original = user_files("kohya_unet_te", "Detail Tweaker.safetensors", folder="downloads")
    before = snapshot(original)

    info = await upload_ok(client, original)

    assert snapshot(original) == before  # bytes, mtime and inode: not modified, not moved
    stored = Path(info["file_path"])
    assert stored.parent == settings.loras_dir.resolve()
    assert stored.is_file()
    assert stored.read_bytes() == before[0]
    assert stored.stat().st_ino != before[2]  # a copy, not a link to the user's file
    assert original.stat().st_nlink == 1
    assert stored_entries(settings) == {stored.name}  # no temporary file left
    assert info["name"] == "Detail Tweaker"
    assert info["sha256"] == sha256_of(original)
    assert info["file_size"] == original.stat().st_size
    assert info["file_missing"] is False
    for field in ("created_at", "updated_at"):
        datetime.fromisoformat(info[field])
    assert isinstance(info["id"], int)

    response = await client.get(f"/loras/{info['id']}")
    assert response.status_code == 200
    assert response.json() == info
    assert await list_loras(client) == [info]

    # The original can still be changed and removed by its owner (not locked, not shared).
    original.write_bytes(b"changed")
    original.unlink()
    assert stored.read_bytes() == before[0]


@pytest.mark.parametrize(
    "source", ["kohya_unet", "kohya_unet_te", "peft_unet", "peft_unet_te", "legacy_unet"]
)
async def test_every_supported_format_uploads(
    client: httpx.AsyncClient, user_files: UserFiles, source: str
) -> None:
    path = user_files(source)
    info = await upload_ok(client, path)
    assert info["name"] == source
    assert Path(info["file_path"]).read_bytes() == path.read_bytes()


async def test_uppercase_extension_is_accepted(
    client: httpx.AsyncClient, settings: Settings, user_files: UserFiles
) -> None:
    path = user_files("peft_unet", "Style.SAFETENSORS")
    info = await upload_ok(client, path)
    assert info["name"] == "Style"
    stored = Path(info["file_path"])
    assert stored.parent == settings.loras_dir.resolve()
    assert stored.read_bytes() == path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Duplicates and names


async def test_same_content_again_is_a_conflict(
    client: httpx.AsyncClient, settings: Settings, user_files: UserFiles
) -> None:
    original = user_files("kohya_unet", "style.safetensors")
    first = await upload_ok(client, original)

    same_file = await assert_refused(client, settings, original, status=409, names="'style'")
    renamed = user_files("kohya_unet", "other name.safetensors", folder="elsewhere")
    same_bytes = await assert_refused(client, settings, renamed, status=409, names="'style'")

    for detail in (same_file, same_bytes):
        assert "already added" in detail
        assert f"(id {first['id']})" in detail
    assert await list_loras(client) == [first]
    assert stored_entries(settings) == {Path(first["file_path"]).name}


async def test_same_name_different_content_gets_distinct_names(
    client: httpx.AsyncClient, settings: Settings, user_files: UserFiles
) -> None:
    a = user_files("style_a", "style.safetensors", folder="a")
    b = user_files("style_b", "style.safetensors", folder="b")
    first = await upload_ok(client, a)
    second = await upload_ok(client, b)

    assert (first["name"], second["name"]) == ("style", "style (2)")
    assert first["file_path"] != second["file_path"]
    assert Path(first["file_path"]).read_bytes() == a.read_bytes()
    assert Path(second["file_path"]).read_bytes() == b.read_bytes()
    assert stored_entries(settings) == {
        Path(first["file_path"]).name,
        Path(second["file_path"]).name,
    }


async def test_direction_overrides_leave_the_display_name(
    client: httpx.AsyncClient, user_files: UserFiles
) -> None:
    # "\u202egnp.safetensors" shows as "safetensors.png" in a list: the name is cleaned like
    # metadata is; the file is still found and copied.
    path = user_files("style_a", "my\u202e\u2066style\u200f.safetensors")
    info = await upload_ok(client, path)
    assert info["name"] == "mystyle"


# ---------------------------------------------------------------------------------------------
# List, get, delete


async def test_list_get_and_delete(
    client: httpx.AsyncClient, settings: Settings, user_files: UserFiles
) -> None:
    assert await list_loras(client) == []
    sources = [user_files(name) for name in ("peft_unet", "kohya_unet", "style_a")]
    originals = {path: snapshot(path) for path in sources}
    added = [await upload_ok(client, path) for path in sources]

    assert await list_loras(client) == added  # creation order
    assert [lora["name"] for lora in added] == ["peft_unet", "kohya_unet", "style_a"]
    assert (await client.get("/loras/")).json()["loras"] == added
    for lora in added:
        response = await client.get(f"/loras/{lora['id']}")
        assert response.status_code == 200
        assert response.json() == lora

    middle = added[1]
    response = await client.delete(f"/loras/{middle['id']}")
    assert response.status_code == 200
    assert response.json() == {
        "id": middle["id"],
        "message": f"LoRA {middle['id']} deleted successfully",
    }
    assert await list_loras(client) == [added[0], added[2]]
    assert not Path(middle["file_path"]).exists()
    assert stored_entries(settings) == {
        Path(added[0]["file_path"]).name,
        Path(added[2]["file_path"]).name,
    }
    assert {path: snapshot(path) for path in sources} == originals

    response = await client.get(f"/loras/{middle['id']}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"LoRA with id {middle['id']} not found"}
    response = await client.delete(f"/loras/{middle['id']}")  # deleting twice
    assert response.status_code == 404
    assert response.json() == {"detail": f"LoRA with id {middle['id']} does not exist."}

    # The same file can be added again once its LoRA is deleted.
    again = await upload_ok(client, sources[1])
    assert again["name"] == "kohya_unet"
    assert Path(again["file_path"]).read_bytes() == originals[sources[1]][0]


async def test_unknown_id(client: httpx.AsyncClient) -> None:
    response = await client.get("/loras/4242")
    assert response.status_code == 404
    assert response.json() == {"detail": "LoRA with id 4242 not found"}
    response = await client.delete("/loras/4242")
    assert response.status_code == 404
    assert response.json() == {"detail": "LoRA with id 4242 does not exist."}
    assert (await client.get("/loras/not-a-number")).status_code == 422


# ---------------------------------------------------------------------------------------------
# Failures and races


async def test_row_that_cannot_be_written_leaves_no_file(
    settings: Settings, user_files: UserFiles
) -> None:
    path = user_files("kohya_unet", "style.safetensors")
    async with running_app(settings, raise_app_exceptions=False) as (_, client):
        lift = sqlite_refuses(settings, "INSERT", "loras")

        response = await upload(client, path)

        assert response.status_code == 500, response.text
        assert response.json() == {"detail": "Internal server error"}
        assert stored_entries(settings) == set()
        assert await list_loras(client) == []

        lift()
        info = await upload_ok(client, path)  # nothing stale blocks a retry
        assert stored_entries(settings) == {Path(info["file_path"]).name}


@asynccontextmanager
async def lined_up_uploads(
    client: httpx.AsyncClient, settings: Settings, paths: list[Path]
) -> AsyncIterator[list[asyncio.Task[httpx.Response]]]:
    """Start concurrent uploads of ``paths`` while another connection holds SQLite's write
    lock, so that every upload passes its duplicate check and places its file before any of
    them can write its row; the lock is released on leaving the block, then each request
    commits or fails. The yielded tasks are done after the block."""
    blocker = sqlite3.connect(database_file(settings), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    tasks = [asyncio.ensure_future(upload(client, path)) for path in paths]
    try:

        def all_placed() -> bool:
            assert not any(task.done() for task in tasks), [t.result().text for t in tasks]
            placed = [e for e in stored_entries(settings) if not e.startswith(".")]
            return len(placed) == len(paths)

        await wait_until(all_placed, what="every upload placed its file")
        yield tasks
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT_TIMEOUT)


async def test_concurrent_uploads_of_the_same_content(
    client: httpx.AsyncClient, settings: Settings, user_files: UserFiles
) -> None:
    paths = [user_files("kohya_unet", f"copy {index}.safetensors") for index in range(3)]

    async with lined_up_uploads(client, settings, paths) as tasks:
        pass
    responses = [task.result() for task in tasks]

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201, 409, 409], [r.text for r in responses]
    winner = next(r.json() for r in responses if r.status_code == 201)
    for response in responses:
        if response.status_code == 409:
            assert f"'{winner['name']}' (id {winner['id']})" in response.json()["detail"]
    assert await list_loras(client) == [winner]
    assert stored_entries(settings) == {Path(winner["file_path"]).name}


async def test_concurrent_uploads_of_different_files_with_the_same_name(
    client: httpx.AsyncClient, settings: Settings, user_files: UserFiles
) -> None:
    a = user_files("style_a", "style.safetensors", folder="a")
    b = user_files("style_b", "style.safetensors", folder="b")

    async with lined_up_uploads(client, settings, [a, b]) as tasks:
        pass
    responses = [task.result() for task in tasks]

    assert [r.status_code for r in responses] == [201, 201], [r.text for r in responses]
    infos = [r.json() for r in responses]
    assert sorted(info["name"] for info in infos) == ["style", "style (2)"]
    assert {Path(info["file_path"]).read_bytes() for info in infos} == {
        a.read_bytes(),
        b.read_bytes(),
    }
    assert stored_entries(settings) == {Path(info["file_path"]).name for info in infos}
    assert await list_loras(client) == sorted(infos, key=lambda info: info["id"])


async def test_twenty_simultaneous_uploads_sharing_a_file_name(
    client: httpx.AsyncClient, settings: Settings, user_dir: Path, distinct_loras: list[bytes]
) -> None:
    # As the UI sends them: no lock games, all at once; each must find its own free name.
    paths = []
    for index, data in enumerate(distinct_loras):
        path = user_dir / str(index) / "same.safetensors"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        paths.append(path)

    responses = await asyncio.gather(*(upload(client, path) for path in paths))

    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses]
    names = sorted(r.json()["name"] for r in responses)
    assert names == sorted(["same"] + [f"same ({n})" for n in range(2, 21)])
    infos = await list_loras(client)
    assert len(infos) == 20
    assert {Path(info["file_path"]).read_bytes() for info in infos} == set(distinct_loras)
    assert stored_entries(settings) == {Path(info["file_path"]).name for info in infos}
