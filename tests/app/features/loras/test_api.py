"""The LoRA endpoints through real HTTP, with real files written by the LoRA file factory.

Every refused upload is checked for its status, for a detail that names the file and the
problem, and for leaving nothing behind (no file, no temporary file, no row).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
from fastapi import FastAPI
from sqlalchemy import text

from app.config import EMBEDDED_MODEL_ID, MiB, Settings
from app.main import create_app
from tests.factories import lora_files

UserFiles = Callable[..., Path]


# ---------------------------------------------------------------------------------------------
# Helpers


@asynccontextmanager
async def running_app(
    settings: Settings, *, raise_app_exceptions: bool = True
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A fresh app on ``settings`` (lifespan run, start-up repair included) and a client.

    ``raise_app_exceptions=False`` lets an unhandled server error arrive as the 500 response a
    real client gets, instead of being raised into the test.
    """
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(
            app=socketio.ASGIApp(app.state.sio, other_asgi_app=app),
            raise_app_exceptions=raise_app_exceptions,
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            yield app, http


def stored_entries(settings: Settings) -> set[str]:
    """Everything in ``<cache>/loras``, hidden temporary files and folders included."""
    folder = settings.loras_dir
    return {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()


async def list_loras(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/loras")
    assert response.status_code == 200, response.text
    loras: list[dict[str, Any]] = response.json()["loras"]
    return loras


async def upload(client: httpx.AsyncClient, path: Path | str) -> httpx.Response:
    return await client.post("/loras/upload", json={"file_path": str(path)})


async def upload_ok(client: httpx.AsyncClient, path: Path) -> dict[str, Any]:
    response = await upload(client, path)
    assert response.status_code == 201, response.text
    info: dict[str, Any] = response.json()
    return info


async def assert_refused(
    client: httpx.AsyncClient,
    settings: Settings,
    path: Path | str,
    *problem: str,
    status: int = 400,
    names: str | None = None,
) -> str:
    """Upload ``path``; expect ``status``, a detail naming the file and each ``problem``
    fragment (case-insensitive), and no new file in ``<cache>/loras`` nor new row."""
    entries_before = stored_entries(settings)
    loras_before = await list_loras(client)
    response = await upload(client, path)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    named = names if names is not None else Path(path).name
    assert named in detail, f"{named!r} not named in {detail!r}"
    for fragment in problem:
        assert fragment.lower() in detail.lower(), f"{fragment!r} not in {detail!r}"
    assert stored_entries(settings) == entries_before
    assert not any(name.startswith(".tmp-") for name in stored_entries(settings))
    assert await list_loras(client) == loras_before
    return detail


def snapshot(path: Path) -> tuple[bytes, int, int]:
    info = path.stat()
    return path.read_bytes(), info.st_mtime_ns, info.st_ino


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def captured_warnings(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    """Records of ``logger_name`` at WARNING and above (``create_app`` resets the root
    logger's handlers, so pytest's ``caplog`` does not see what the app logs)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


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

    def release_reader() -> None:
        # If the server opened the FIFO and waits for a writer, give it one (then EOF), so a
        # regression fails this test instead of hanging the whole run.
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody is reading it
            return
        os.close(fd)

    watchdog = threading.Timer(10, release_reader)
    watchdog.start()
    started = time.monotonic()
    try:
        detail = await asyncio.wait_for(
            assert_refused(client, settings, fifo, "not a regular file", names=str(fifo)), 10
        )
    finally:
        watchdog.cancel()
    assert time.monotonic() - started < 5, f"took too long: {detail}"


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
            "header_bomb", ("not a valid safetensors file", "declares a header"), id="header-bomb"
        ),
        pytest.param("pickle_renamed", ("not a safetensors file", "pickle"), id="pickle-renamed"),
        pytest.param("unrelated", ("no lora weights",), id="unrelated-tensors"),
        pytest.param(
            "full_checkpoint", ("looks like a full model checkpoint",), id="full-checkpoint"
        ),
        pytest.param("loha", ("loha", "not supported"), id="loha"),
        pytest.param("lokr", ("lokr", "not supported"), id="lokr-kohya"),
        pytest.param("lokr_peft", ("lokr", "not supported"), id="lokr-peft"),
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


async def _refuse_lora_inserts(app: FastAPI) -> None:
    """A real database fault: a trigger that aborts every INSERT into ``loras``."""
    async with app.state.session_factory() as session:
        await session.execute(
            text(
                "CREATE TRIGGER refuse_loras BEFORE INSERT ON loras "
                "BEGIN SELECT RAISE(ABORT, 'boom'); END"
            )
        )
        await session.commit()


async def test_row_that_cannot_be_written_leaves_no_file(
    settings: Settings, user_files: UserFiles
) -> None:
    path = user_files("kohya_unet", "style.safetensors")
    async with running_app(settings, raise_app_exceptions=False) as (app, client):
        await _refuse_lora_inserts(app)

        response = await upload(client, path)

        assert response.status_code == 500, response.text
        assert stored_entries(settings) == set()
        assert await list_loras(client) == []

        async with app.state.session_factory() as session:
            await session.execute(text("DROP TRIGGER refuse_loras"))
            await session.commit()
        info = await upload_ok(client, path)  # nothing stale blocks a retry
        assert stored_entries(settings) == {Path(info["file_path"]).name}


async def test_unexpected_error_answers_json_detail(
    settings: Settings, user_files: UserFiles
) -> None:
    path = user_files("kohya_unet", "style.safetensors")
    async with running_app(settings, raise_app_exceptions=False) as (app, client):
        await _refuse_lora_inserts(app)
        response = await upload(client, path)
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error"}


@asynccontextmanager
async def lined_up_uploads(
    client: httpx.AsyncClient, settings: Settings, paths: list[Path]
) -> AsyncIterator[list[asyncio.Task[httpx.Response]]]:
    """Start concurrent uploads of ``paths`` while another connection holds SQLite's write
    lock, so that every upload passes its duplicate check, places its file and waits at its
    INSERT; the lock is released on leaving the block, then each request commits or fails.
    The yielded tasks are done after the block."""
    database = settings.resolved_database_url.removeprefix("sqlite+aiosqlite:///")
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    tasks = [asyncio.ensure_future(upload(client, path)) for path in paths]
    try:
        deadline = time.monotonic() + 10
        while len([e for e in stored_entries(settings) if not e.startswith(".")]) < len(paths):
            assert time.monotonic() < deadline, stored_entries(settings)
            assert not any(task.done() for task in tasks), [t.result().text for t in tasks]
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # into their INSERTs, which wait for the lock
        yield tasks
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)


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


# ---------------------------------------------------------------------------------------------
# Start-up repair


async def test_startup_removes_leftovers_and_reports_missing_files(
    settings: Settings, user_files: UserFiles
) -> None:
    kept_source = user_files("peft_unet")
    lost_source = user_files("kohya_unet", "lost style.safetensors")
    async with running_app(settings) as (_, client):
        kept = await upload_ok(client, kept_source)
        lost = await upload_ok(client, lost_source)

    loras_dir = settings.loras_dir
    Path(lost["file_path"]).unlink()  # (d) a row whose file is gone
    shutil.copyfile(lost_source, loras_dir / "stray.safetensors")  # (a) a file with no row
    (loras_dir / ".tmp-xyz.safetensors").write_bytes(b"half a copy")  # (b)
    in_use = loras_dir / ".inuse-abc"  # (c) pinned copies of a crashed generation
    in_use.mkdir()
    os.link(kept["file_path"], in_use / "0.safetensors")

    with captured_warnings("app.features.loras.service") as warnings:
        async with running_app(settings) as (_, client):
            assert stored_entries(settings) == {Path(kept["file_path"]).name}
            assert Path(kept["file_path"]).read_bytes() == kept_source.read_bytes()

            listed = await list_loras(client)
            assert [lora["id"] for lora in listed] == [kept["id"], lost["id"]]
            assert [lora["file_missing"] for lora in listed] == [False, True]
            response = await client.get(f"/loras/{lost['id']}")
            assert response.status_code == 200
            assert response.json() == {**lost, "file_missing": True}

            # Generating with it is refused with a reason, before the pipeline is touched.
            response = await client.post("/models/load", json={"model_id": EMBEDDED_MODEL_ID})
            assert response.status_code == 200, response.text
            config = {
                "prompt": "a cat",
                "width": 64,
                "height": 64,
                "steps": 1,
                "seed": 1,
                "loras": [{"lora_id": lost["id"], "weight": 1}],
            }
            response = await client.post("/histories", json=config)
            assert response.status_code == 200, response.text
            response = await client.post(
                "/generators", json={"history_id": response.json(), "config": config}
            )
            assert response.status_code == 400, response.text
            detail = response.json()["detail"]
            assert "missing" in detail
            assert f"'lost style' (id {lost['id']})" in detail
            assert not any(name.startswith(".inuse-") for name in stored_entries(settings))

            # A LoRA whose file is gone can still be deleted.
            response = await client.delete(f"/loras/{lost['id']}")
            assert response.status_code == 200, response.text
            assert [lora["id"] for lora in await list_loras(client)] == [kept["id"]]

    messages = [record.getMessage() for record in warnings]
    assert any(
        "lost style" in message and f"id {lost['id']}" in message and "missing" in message
        for message in messages
    ), messages
