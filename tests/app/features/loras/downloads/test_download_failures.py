"""Downloads that fail: each ends ``failed`` with a detail a user understands, emits
``lora_download_failed``, and leaves nothing behind (no file, no temporary file, no row)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from tests.api import download_lora, start_lora_download, wait_for_lora_download
from tests.app.features.loras.helpers import assert_nothing_kept, stored_entries_at
from tests.fake_remote import FakeRemote, closed_port_url
from tests.harness import Event, SmallDisk, running_app


async def assert_failed(
    client: httpx.AsyncClient, settings: Settings, body: dict[str, Any], *fragments: str
) -> str:
    info = await download_lora(client, body)
    assert info["state"] == "failed", info
    detail: str = info["detail"]
    for fragment in fragments:
        assert fragment.lower() in detail.lower(), f"{fragment!r} not in {detail!r}"
    assert info["lora"] is None
    await assert_nothing_kept(client, settings)
    return detail


@pytest.mark.parametrize("declared", [False, True], ids=["no-content-length", "declared"])
async def test_size_limit(
    settings: Settings, remote: FakeRemote, lora_bytes: dict[str, bytes], declared: bool
) -> None:
    data = lora_bytes["kohya_unet"]
    url = remote.serve("/big.safetensors", data, content_length=declared, chunk=4096)
    small = settings.model_copy(update={"lora_max_file_size": len(data) - 1})
    async with running_app(small) as (_, client):
        detail = await assert_failed(
            client, small, {"url": url}, "'big.safetensors'", "exceeds limit"
        )
    if declared:  # refused on the declared size: said at once
        assert detail.startswith(f"File size ({len(data) / 1024 / 1024:.1f}MB)")


async def test_content_length_lying_low(
    client: httpx.AsyncClient, settings: Settings, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    data = lora_bytes["kohya_unet"]
    url = remote.serve("/short.safetensors", data, content_length=len(data) // 2)
    await assert_failed(client, settings, {"url": url}, "'short.safetensors'", "truncated")


async def test_civitai_hash_mismatch(
    client: httpx.AsyncClient,
    settings: Settings,
    remote: FakeRemote,
    lora_bytes: dict[str, bytes],
    emitted: list[Event],
) -> None:
    remote.civitai_version(9, lora_bytes["kohya_unet"], sha256="ab" * 32)
    detail = await assert_failed(
        client,
        settings,
        {"civitai": {"model_version_id": 9}},
        "sha256",
        "ab" * 32,
        "nothing was kept",
    )
    names = [name for name, _ in emitted]
    assert (names[0], names[-1]) == ("lora_download_started", "lora_download_failed")
    assert set(names[1:-1]) == {"lora_download_progress"}  # throttled: one or more
    assert emitted[-1][1] == {"download_id": emitted[0][1]["download_id"], "detail": detail}


async def test_redirect_loop(
    client: httpx.AsyncClient, settings: Settings, remote: FakeRemote
) -> None:
    remote.redirects["/loop/a"] = remote.url("/loop/b")
    remote.redirects["/loop/b"] = remote.url("/loop/a")
    await assert_failed(client, settings, {"url": remote.url("/loop/a")}, "too many redirects")
    assert len(remote.requests) == 6  # the first request and five redirects


async def test_redirect_to_another_scheme(
    client: httpx.AsyncClient, settings: Settings, remote: FakeRemote
) -> None:
    remote.redirects["/away.safetensors"] = "file:///etc/passwd"
    await assert_failed(client, settings, {"url": remote.url("/away.safetensors")}, "'file:'")


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("hf-404", ("not found on hugging face: someone/repo/missing.safetensors",)),
        ("hf-401", ("needs an access token", "401")),
        ("hf-403", ("refused access", "with this token", "403")),
        ("civitai-404", ("not found on civitai: model version 404",)),
        ("url-404", ("not found", "404")),
        ("url-502", ("failed (http 502)", "try again later", "tried 3 times")),
        ("checkpoint", ("is a checkpoint, not a lora",)),
        ("pickle-file", ("'model.safetensors'", "not a safetensors file", "pickle")),
        ("html-page", ("'page.safetensors'", "not a valid safetensors file")),
    ],
)
async def test_readable_errors(
    client: httpx.AsyncClient,
    settings: Settings,
    remote: FakeRemote,
    lora_bytes: dict[str, bytes],
    case: str,
    fragments: tuple[str, ...],
) -> None:
    gated = "someone/gated"
    remote.hugging_face(gated, "g.safetensors", lora_bytes["kohya_unet"], token="right")
    remote.statuses["/broken.safetensors"] = 502
    remote.civitai_version(5, lora_bytes["kohya_unet"], model_type="Checkpoint")
    remote.serve("/model.safetensors", lora_bytes["pickle_renamed"])
    remote.serve(
        "/page.safetensors", b"<!doctype html><title>Log in</title>", content_type="text/html"
    )
    bodies: dict[str, dict[str, Any]] = {
        "hf-404": {"huggingface": {"repo_id": "someone/repo", "filename": "missing.safetensors"}},
        "hf-401": {"huggingface": {"repo_id": gated, "filename": "g.safetensors"}},
        "hf-403": {"huggingface": {"repo_id": gated, "filename": "g.safetensors"}, "token": "x"},
        "civitai-404": {"civitai": {"model_version_id": 404}},
        "url-404": {"url": remote.url("/nothing.safetensors")},
        "url-502": {"url": remote.url("/broken.safetensors")},
        "checkpoint": {"civitai": {"model_version_id": 5}},
        "pickle-file": {"url": remote.url("/model.safetensors")},
        "html-page": {"url": remote.url("/page.safetensors")},
    }
    body = bodies[case]
    await assert_failed(client, settings, body, *fragments)


async def test_network_down_after_retries(
    client: httpx.AsyncClient, settings: Settings, emitted: list[Event]
) -> None:
    url = closed_port_url("/lora.safetensors")
    detail = await assert_failed(
        client, settings, {"url": url}, "could not connect to 127.0.0.1", "refused", "tried 3 times"
    )
    assert (
        "lora_download_failed",
        {"download_id": emitted[0][1]["download_id"], "detail": detail},
    ) in emitted


async def test_civitai_api_down_fails_the_download_not_the_request(
    settings: Settings,
) -> None:
    down = settings.model_copy(update={"civitai_base_url": closed_port_url("")})
    async with running_app(down) as (_, client):
        started = await start_lora_download(client, {"civitai": {"model_version_id": 3}})
        assert started["state"] == "failed"
        assert "could not connect" in started["detail"].lower()
        assert (await wait_for_lora_download(client, started["id"]))["state"] == "failed"


async def test_the_final_state_is_published_after_the_clean_up(
    app: FastAPI, client: httpx.AsyncClient, settings: Settings, remote: FakeRemote
) -> None:
    # A client that reads "failed" and then looks at the folder must find it clean: what
    # the folder holds is recorded at the very moment the final event is emitted. (A
    # redirect loop fails the transfer itself, while the temporary file exists.)
    remote.redirects["/loop/a"] = remote.url("/loop/b")
    remote.redirects["/loop/b"] = remote.url("/loop/a")
    with stored_entries_at(app, settings, "lora_download_failed") as seen_at_the_end:
        await assert_failed(client, settings, {"url": remote.url("/loop/a")}, "redirects")
    assert seen_at_the_end == [set()]


async def test_a_full_disk_fails_the_download_with_a_507_detail_and_keeps_nothing(
    settings: Settings,
    small_disk_settings: tuple[Settings, SmallDisk],
    remote: FakeRemote,
    lora_bytes: dict[str, bytes],
) -> None:
    small, disk = small_disk_settings
    remote_fields = ("huggingface_base_url", "lora_download_attempts", "lora_download_retry_delay")
    small = small.model_copy(update={name: getattr(settings, name) for name in remote_fields})
    url = remote.serve("/style.safetensors", lora_bytes["kohya_unet"])
    async with running_app(small) as (_, client):
        disk.fill()
        await assert_failed(client, small, {"url": url}, "the disk is full", "'style.safetensors'")
        disk.free()
        assert (await download_lora(client, {"url": url}))["state"] == "completed"
