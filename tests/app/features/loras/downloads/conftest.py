"""Fixtures for LoRA downloads: a fake remote (Hugging Face, CivitAI, plain files) on
loopback, settings pointing at it with quick retries, real LoRA files, and helpers that wait
with bounded timeouts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.app.features.loras.conftest import LoRASources
from tests.fake_remote import FakeRemote
from tests.harness import WAIT_TIMEOUT

FINISHED = {"completed", "failed", "cancelled"}
TIMEOUT = WAIT_TIMEOUT  # a bound for a broken run, not a speed target


@pytest.fixture
def settings(settings: Settings, remote: FakeRemote) -> Settings:
    """The suite's settings, with both services on the fake remote and quick retries."""
    return settings.model_copy(
        update={
            "huggingface_base_url": remote.url("/hf"),
            "civitai_base_url": remote.url("/civitai"),
            "lora_download_attempts": 3,
            "lora_download_retry_delay": 0.01,
            "lora_download_timeout": 5.0,
        }
    )


@pytest.fixture(scope="session")
def lora_bytes(lora_sources: LoRASources) -> dict[str, bytes]:
    """Bytes of the factory's files: ``kohya_unet``, ``peft_unet``, ``pickle_renamed``..."""
    return {path.stem: path.read_bytes() for path in lora_sources.folder.glob("*.safetensors")}


async def start(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/loras/download", json=body)
    assert response.status_code == 202, response.text
    info: dict[str, Any] = response.json()
    return info


async def wait_for(
    client: httpx.AsyncClient,
    download_id: str,
    states: set[str] = FINISHED,
    timeout: float = TIMEOUT,
    min_bytes: int = 0,
) -> dict[str, Any]:
    """Poll ``GET /loras/downloads/{id}`` until its state is in ``states`` (and at least
    ``min_bytes`` arrived); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(f"/loras/downloads/{download_id}")
        assert response.status_code == 200, response.text
        info: dict[str, Any] = response.json()
        if info["state"] in states and info["bytes_done"] >= min_bytes:
            return info
        assert time.monotonic() < deadline, f"still {info} after {timeout}s"
        await asyncio.sleep(0.02)


async def download(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """Start a download and wait until it finished."""
    return await wait_for(client, (await start(client, body))["id"])


def entries(settings: Settings) -> set[str]:
    """Everything in ``<cache>/loras``, temporary files included."""
    folder = settings.loras_dir
    return {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()


async def lora_rows(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/loras")
    assert response.status_code == 200, response.text
    loras: list[dict[str, Any]] = response.json()["loras"]
    return loras


async def assert_nothing_kept(client: httpx.AsyncClient, settings: Settings) -> None:
    assert entries(settings) == set()
    assert await lora_rows(client) == []
