"""How the bytes travel: resuming after a dropped connection, starting over where the server
cannot resume, cancelling, many downloads at once, and shutdown in the middle of one."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.features.loras.downloads.schemas import LoRADownloadRequest
from tests.api import download_lora, list_loras, start_lora_download, wait_for_lora_download
from tests.app.features.loras.helpers import assert_nothing_kept, stored_entries
from tests.fake_remote import FakeRemote
from tests.harness import running_app, wait_until


@pytest.mark.parametrize("ranges", [True, False], ids=["resumed", "restarted"])
async def test_dropped_connection(
    client: httpx.AsyncClient,
    settings: Settings,
    remote: FakeRemote,
    lora_bytes: dict[str, bytes],
    ranges: bool,
) -> None:
    data = lora_bytes["kohya_unet_te"]
    cut = len(data) // 3
    url = remote.serve("/flaky.safetensors", data, ranges=ranges, drop_after=cut, chunk=4096)

    info = await download_lora(client, {"url": url})

    assert info["state"] == "completed", info
    first, second = remote.requests_to("/flaky.safetensors")
    assert "Range" not in first.headers
    if ranges:
        assert second.headers["Range"] == f"bytes={cut}-"
    else:
        assert "Range" not in second.headers
    stored = Path(info["lora"]["file_path"])
    assert stored.read_bytes() == data  # byte-identical
    assert info["lora"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert stored_entries(settings) == {stored.name}


async def test_cancel_mid_way(
    client: httpx.AsyncClient, settings: Settings, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    # 1 KiB arrives, the rest only if the test lets it (never: it cancels).
    held = threading.Event()
    data = lora_bytes["kohya_unet"]
    url = remote.serve("/slow.safetensors", data, chunk=1024, hold=held, hold_after=1024)
    started = await start_lora_download(client, {"url": url})
    await wait_for_lora_download(client, started["id"], {"downloading"}, min_bytes=1024)
    assert any(name.startswith(".tmp-") for name in stored_entries(settings))

    response = await client.delete(f"/loras/downloads/{started['id']}")

    assert response.status_code == 200, response.text
    assert response.json() == {
        "id": started["id"],
        "message": f"LoRA download {started['id']} cancelled",
    }
    info = (await client.get(f"/loras/downloads/{started['id']}")).json()
    assert info["state"] == "cancelled"
    assert 0 < info["bytes_done"] < len(data)
    await assert_nothing_kept(client, settings)
    again = await client.delete(f"/loras/downloads/{started['id']}")
    assert again.status_code == 409
    assert "already cancelled" in again.json()["detail"]


async def test_cancel_a_finished_download_is_a_conflict(
    client: httpx.AsyncClient, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    done = await download_lora(
        client, {"url": remote.serve("/a.safetensors", lora_bytes["peft_unet"])}
    )
    response = await client.delete(f"/loras/downloads/{done['id']}")
    assert response.status_code == 409
    assert "already completed" in response.json()["detail"]
    assert len(await list_loras(client)) == 1


async def test_burst_of_twenty(
    settings: Settings, remote: FakeRemote, distinct_loras: list[bytes]
) -> None:
    urls = [
        remote.serve(f"/burst/{index}/style {index}.safetensors", data, chunk=8192)
        for index, data in enumerate(distinct_loras)
    ]
    async with running_app(settings) as (_, client):
        started = await asyncio.gather(*(start_lora_download(client, {"url": url}) for url in urls))
        finished = await asyncio.gather(
            *(wait_for_lora_download(client, info["id"]) for info in started)
        )

        assert [info["state"] for info in finished] == ["completed"] * 20, [
            info["detail"] for info in finished
        ]
        rows = await list_loras(client)
    assert sorted(row["name"] for row in rows) == sorted(f"style {i}" for i in range(20))
    assert {row["sha256"] for row in rows} == {
        hashlib.sha256(data).hexdigest() for data in distinct_loras
    }
    assert stored_entries(settings) == {
        Path(row["file_path"]).name for row in rows
    }  # no temp files
    assert len(stored_entries(settings)) == 20


async def test_queued_beyond_the_parallel_limit(
    settings: Settings, remote: FakeRemote, distinct_loras: list[bytes]
) -> None:
    hold = threading.Event()  # the first answer waits until the test says so
    urls = [
        remote.serve(f"/q{index}.safetensors", data, hold=hold if index == 0 else None)
        for index, data in enumerate(distinct_loras[:3])
    ]
    one_at_a_time = settings.model_copy(update={"lora_download_max_parallel": 1})
    try:
        async with running_app(one_at_a_time) as (_, client):
            first, second, third = [await start_lora_download(client, {"url": url}) for url in urls]
            # The first download holds the only slot: its request reached the server.
            await wait_until(lambda: bool(remote.requests_to("/q0.safetensors")), what="q0")
            states = [
                (await client.get(f"/loras/downloads/{d['id']}")).json()["state"]
                for d in (first, second, third)
            ]
            assert states == ["downloading", "queued", "queued"]
            assert (await client.delete(f"/loras/downloads/{third['id']}")).status_code == 200
            hold.set()
            assert (await wait_for_lora_download(client, second["id"]))["state"] == "completed"
            assert (await wait_for_lora_download(client, first["id"]))["state"] == "completed"
            listed = (await client.get("/loras/downloads")).json()["downloads"]
            assert [(d["id"], d["state"]) for d in listed] == [
                (third["id"], "cancelled"),
                (second["id"], "completed"),
                (first["id"], "completed"),
            ]
            assert remote.requests_to("/q2.safetensors") == []  # cancelled while queued
    finally:
        hold.set()


async def test_shutdown_cancels_running_downloads(
    settings: Settings, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    held = threading.Event()  # never set: the download is under way at shutdown
    data = lora_bytes["kohya_unet"]
    url = remote.serve("/slow.safetensors", data, chunk=1024, hold=held, hold_after=1024)
    async with running_app(settings) as (app, client):
        started = await start_lora_download(client, {"url": url})
        await wait_for_lora_download(client, started["id"], {"downloading"}, min_bytes=1024)
        manager = app.state.lora_downloads
    assert manager.get(started["id"]).state == "cancelled"
    assert stored_entries(settings) == set()
    async with running_app(settings) as (_, client):
        assert await list_loras(client) == []


async def test_cancelled_before_it_ever_ran(
    app: FastAPI, settings: Settings, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    manager = app.state.lora_downloads
    request = LoRADownloadRequest(url=remote.serve("/a.safetensors", lora_bytes["kohya_unet"]))
    async with app.state.session_factory() as session:
        started = await manager.start(request, session)  # nothing awaited: task not yet run
        cancelled = await manager.cancel(started.id)  # cancels before its first step
    assert cancelled.state == "cancelled"
    assert remote.requests == []
    assert stored_entries(settings) == set()


async def test_size_unknown_until_the_end(
    client: httpx.AsyncClient, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    data = lora_bytes["kohya_unet"]
    held = threading.Event()
    url = remote.serve(
        "/n.safetensors", data, content_length=False, chunk=4096, hold=held, hold_after=4096
    )
    started = await start_lora_download(client, {"url": url})
    running = await wait_for_lora_download(client, started["id"], {"downloading"}, min_bytes=4096)
    assert running["bytes_total"] is None
    held.set()
    done = await wait_for_lora_download(client, started["id"])
    assert done["state"] == "completed", done
    assert done["bytes_done"] == done["bytes_total"] == len(data)
    assert Path(done["lora"]["file_path"]).read_bytes() == data
