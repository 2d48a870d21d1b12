"""Downloads are bounded: a server trickling bytes, or sending steadily forever, cannot hold a
download (and one of the parallel slots) without end, and the queue has a cap (429).

Every wait is "eventually" (``wait_for_lora_download``/``wait_until`` with the harness's
bound): the limits are tiny so a broken bound shows as a test that runs into that bound, never
as a race."""

from __future__ import annotations

import json
import re
import threading

import pytest

from app.config import Settings
from tests.api import download_lora, start_lora_download, wait_for_lora_download
from tests.app.features.loras.helpers import (
    assert_nothing_kept,
    stored_entries,
    stored_entries_at,
)
from tests.fake_remote import FakeRemote
from tests.harness import WAIT_TIMEOUT, recorded_events, running_app, wait_until

STALL = re.compile(
    r"^The server sent only \d+ bytes? in the last 0\.5 s; the download was stopped\. "
    r"Try again later\.$"
)


@pytest.mark.parametrize("how", ["trickle", "drops-and-resumes"])
async def test_a_stalled_download_fails_for_good(
    settings: Settings, remote: FakeRemote, how: str
) -> None:
    # A few bytes every 50 ms never trip httpx's read timeout; dropping the connection after
    # a few bytes every time resets the retry count on each attempt (progress was made).
    if how == "trickle":
        url = remote.serve(
            "/slow.safetensors", b"\0" * 64, content_length=False, endless=True, chunk=4, delay=0.05
        )
    else:
        url = remote.serve("/slow.safetensors", b"\0" * 1024 * 1024, drop_after=4, drop_always=True)
    stalling = settings.model_copy(update={"lora_download_stall_timeout": 0.5})
    async with running_app(stalling) as (app, client):
        with stored_entries_at(app, stalling, "lora_download_failed") as at_the_end:
            info = await download_lora(client, {"url": url})
        assert info["state"] == "failed", info
        assert STALL.match(info["detail"]), info["detail"]
        assert at_the_end == [set()]  # the temporary file was gone before "failed" was sent
        await assert_nothing_kept(client, stalling)
    if how == "trickle":
        assert len(remote.requests_to("/slow.safetensors")) == 1  # a stall is not retried


async def test_a_download_past_its_deadline_fails(settings: Settings, remote: FakeRemote) -> None:
    # 16 KiB every 10 ms is far above the stall floor, and never ends.
    url = remote.serve(
        "/endless.safetensors", b"\0" * 16 * 1024, content_length=False, endless=True, delay=0.01
    )
    bounded = settings.model_copy(update={"lora_download_deadline": 1.0})
    async with running_app(bounded) as (_, client):
        info = await download_lora(client, {"url": url})
        assert info["state"] == "failed", info
        assert info["detail"] == (
            "The download took longer than 1 s (LOCALAI_LORA_DOWNLOAD_DEADLINE = 1 s) and was "
            "stopped. Try again later, or raise that limit."
        )
        await assert_nothing_kept(client, bounded)


async def test_too_many_unfinished_downloads_are_refused(
    settings: Settings, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    hold = threading.Event()  # the server answers nothing until the test says so
    paths = [f"/held{i}.safetensors" for i in range(3)]
    urls = [
        remote.serve(path, lora_bytes[name], hold=hold)
        for path, name in zip(paths, ["kohya_unet", "kohya_unet_te", "peft_unet"], strict=True)
    ]
    limited = settings.model_copy(
        update={
            "lora_download_max_parallel": 1,
            "lora_download_max_queued": 2,
            "lora_download_timeout": WAIT_TIMEOUT,  # held answers must not time out
        }
    )
    try:
        async with running_app(limited) as (app, client):
            running = await start_lora_download(client, {"url": urls[0]})
            queued = await start_lora_download(client, {"url": urls[1]})
            await wait_until(lambda: bool(remote.requests_to(paths[0])), what="first request")
            kept = stored_entries(limited)  # the running download's temporary file

            with recorded_events(app) as events:
                refused = await client.post("/loras/download", json={"url": urls[2]})

            assert refused.status_code == 429, refused.text
            assert refused.json() == {
                "detail": "2 LoRA downloads are already queued or running (the limit is 2, "
                "LOCALAI_LORA_DOWNLOAD_MAX_QUEUED). Wait until some have finished, or cancel "
                "some, then try again."
            }
            assert events == []
            assert stored_entries(limited) == kept
            assert remote.requests_to(paths[2]) == []
            listed = (await client.get("/loras/downloads")).json()["downloads"]
            assert {d["id"] for d in listed} == {running["id"], queued["id"]}

            cancelled = await client.delete(f"/loras/downloads/{queued['id']}")
            assert cancelled.status_code == 200, cancelled.text
            again = await start_lora_download(client, {"url": urls[2]})
            hold.set()
            for download in (running, again):
                assert (await wait_for_lora_download(client, download["id"]))[
                    "state"
                ] == "completed"
    finally:
        hold.set()


async def test_a_civitai_lookup_that_never_answers_fails_within_the_lookup_timeout(
    settings: Settings, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    """The lookup runs inside POST /loras/download: a CivitAI API that accepts the
    connection and never answers must not hold the request (nor a queue place)."""
    document = remote.civitai_version(4321, lora_bytes["kohya_unet"])
    hold = threading.Event()  # never set before the lookup gives up
    remote.serve(
        "/civitai/api/v1/model-versions/4321",
        json.dumps(document).encode(),
        hold=hold,
        content_type="application/json",
    )
    del remote.documents["/civitai/api/v1/model-versions/4321"]
    bounded = settings.model_copy(
        update={"lookup_timeout": 0.5, "lora_download_timeout": WAIT_TIMEOUT}
    )
    try:
        async with running_app(bounded) as (_app, client):
            started = await start_lora_download(client, {"civitai": {"model_version_id": 4321}})
            assert started["state"] == "failed"
            assert started["detail"] == (
                "CivitAI did not answer within 0.5 s (LOCALAI_LOOKUP_TIMEOUT); try again later."
            )
            await assert_nothing_kept(client, bounded)
    finally:
        hold.set()
