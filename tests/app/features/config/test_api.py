"""The UI's settings endpoints, through HTTP, persisted in the real user_config.json."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from app.config import Settings
from app.features.config.service import reported_device_index
from tests.harness import running_app

# These expectations describe a machine without CUDA or MPS, as the test machine is.
cpu_only = pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(),
    reason="expects a machine without CUDA and MPS",
)

TRADITIONAL = ["Lanczos", "Bicubic", "Bilinear", "Nearest"]
UNCHOSEN = -2 if torch.cuda.is_available() else -1
"""What ``/config/`` says before the user chose a device: -2 sends the UI to its GPU page,
which is a dead end on a machine without a CUDA GPU, so such a machine says -1 (CPU)."""


def _without_memory(config: dict[str, Any]) -> dict[str, Any]:
    """The config minus the fields that depend on the machine's memory right now."""
    return {k: v for k, v in config.items() if k not in ("total_ram_memory", "total_gpu_memory")}


async def test_defaults_before_first_run_setup(client: httpx.AsyncClient) -> None:
    response = await client.get("/config/")
    assert response.status_code == 200
    config = response.json()
    assert config["device_index"] == UNCHOSEN
    assert config["safety_check_enabled"] is True
    assert config["gpu_scale_factor"] == 0.5
    assert config["ram_scale_factor"] == 0.5
    assert isinstance(config["total_ram_memory"], int)
    assert config["total_ram_memory"] > 0


async def test_upscalers_list_the_four_traditional_ones_only(
    client: httpx.AsyncClient,
) -> None:
    # The AI upscalers are not installed: listing them made the UI pick one by default.
    sections = (await client.get("/config/")).json()["upscalers"]
    assert [section["method"] for section in sections] == ["traditional"]
    [traditional] = sections
    assert [option["value"] for option in traditional["options"]] == TRADITIONAL
    for section in sections:
        assert section["title"]
        for option in section["options"]:
            assert option["method"] == section["method"]
            assert 0 <= option["suggested_denoise_strength"] <= 1
            assert option["name"]
            assert option["description"]
            assert isinstance(option["is_recommended"], bool)


@cpu_only
async def test_total_gpu_memory_is_zero_without_a_gpu(client: httpx.AsyncClient) -> None:
    assert (await client.get("/config/")).json()["total_gpu_memory"] == 0


@pytest.mark.parametrize("body", [{"device_index": -1}, {"device_index": "-1"}, {}])
async def test_choose_the_cpu(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    # The UI sends the radio value, possibly as a numeric string, or nothing on the
    # CPU-only screen: all three mean the CPU.
    response = await client.put("/config/device", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["device_index"] == -1
    assert (await client.get("/config/")).json()["device_index"] == -1


@cpu_only
async def test_gpu_index_this_machine_lacks_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.put("/config/device", json={"device_index": 0})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert "0" in detail
    assert (await client.get("/config/")).json()["device_index"] == UNCHOSEN  # nothing stored


@pytest.mark.parametrize("value", [-5, "cpu", 1.5])
async def test_invalid_device_index_is_a_validation_error(
    client: httpx.AsyncClient, value: object
) -> None:
    response = await client.put("/config/device", json={"device_index": value})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "device_index"]


async def test_settings_survive_a_restart(client: httpx.AsyncClient, settings: Settings) -> None:
    assert (await client.put("/config/device", json={"device_index": -1})).status_code == 200
    body = {"gpu_scale_factor": 0.3, "ram_scale_factor": 0.8}
    assert (await client.put("/config/max-memory", json=body)).status_code == 200
    assert (await client.put("/config/safety-check", json={"enabled": False})).status_code == 200
    before = (await client.get("/config/")).json()

    # The file on disk holds the choices (written atomically: no temporary file left over).
    stored = json.loads(settings.user_config_file.read_text(encoding="utf-8"))
    assert stored["device_index"] == -1
    assert stored["safety_check_enabled"] is False
    assert not [p for p in settings.cache_dir.iterdir() if p.name.startswith(".tmp-")]

    # A second backend on the same cache folder (the first one still running is fine: the
    # config file is read on each request) sees the same settings.
    async with running_app(settings) as (second, http):
        assert second.state.model_manager.safety_check_enabled is False
        after = (await http.get("/config/")).json()
    assert _without_memory(after) == _without_memory(before)
    assert after["device_index"] == -1
    assert after["gpu_scale_factor"] == 0.3
    assert after["ram_scale_factor"] == 0.8
    assert after["safety_check_enabled"] is False


async def test_max_memory_is_stored(client: httpx.AsyncClient) -> None:
    body = {"gpu_scale_factor": 0.1, "ram_scale_factor": "1.0"}
    response = await client.put("/config/max-memory", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["gpu_scale_factor"] == 0.1
    assert response.json()["ram_scale_factor"] == 1.0
    config = (await client.get("/config/")).json()
    assert (config["gpu_scale_factor"], config["ram_scale_factor"]) == (0.1, 1.0)


@pytest.mark.parametrize(
    "body",
    [
        {"gpu_scale_factor": 0.05, "ram_scale_factor": 0.5},
        {"gpu_scale_factor": 0.5, "ram_scale_factor": 1.5},
        {"gpu_scale_factor": 0.5},
    ],
)
async def test_max_memory_out_of_range_is_refused(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await client.put("/config/max-memory", json=body)
    assert response.status_code == 422
    config = (await client.get("/config/")).json()
    assert (config["gpu_scale_factor"], config["ram_scale_factor"]) == (0.5, 0.5)


async def test_safety_check_switches_off_and_on(client: httpx.AsyncClient, app: FastAPI) -> None:
    models = app.state.model_manager
    response = await client.put("/config/safety-check", json={"enabled": False})
    assert response.status_code == 200
    assert response.json()["safety_check_enabled"] is False
    assert (await client.get("/config/")).json()["safety_check_enabled"] is False
    assert models.safety_check_enabled is False  # the next generation uses it at once

    response = await client.put("/config/safety-check", json={"enabled": True})
    assert response.json()["safety_check_enabled"] is True
    assert models.safety_check_enabled is True


async def test_safety_check_needs_a_boolean(client: httpx.AsyncClient) -> None:
    assert (await client.put("/config/safety-check", json={})).status_code == 422
    response = await client.put("/config/safety-check", json={"enabled": "maybe"})
    assert response.status_code == 422


@pytest.mark.parametrize(
    "content",
    ["{not json", "[1, 2]", '{"gpu_scale_factor": 5}', '{"device_index": "gpu"}'],
)
async def test_a_broken_config_file_falls_back_to_defaults(
    client: httpx.AsyncClient, settings: Settings, content: str
) -> None:
    settings.user_config_file.write_text(content, encoding="utf-8")
    response = await client.get("/config/")
    assert response.status_code == 200
    config = response.json()
    assert config["device_index"] == UNCHOSEN
    assert (config["gpu_scale_factor"], config["ram_scale_factor"]) == (0.5, 0.5)
    # The next change writes a valid file again.
    assert (await client.put("/config/device", json={"device_index": -1})).status_code == 200
    assert json.loads(settings.user_config_file.read_text(encoding="utf-8"))["device_index"] == -1


def test_never_chosen_is_reported_as_cpu_only_without_a_gpu_to_choose() -> None:
    assert reported_device_index(-2, gpu_count=0) == -1
    assert reported_device_index(-2, gpu_count=1) == -2  # the UI's GPU page has one to offer
    assert reported_device_index(-1, gpu_count=2) == -1
    assert reported_device_index(1, gpu_count=2) == 1


@cpu_only
async def test_a_cpu_only_machine_is_not_sent_to_the_gpu_page(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    assert (await client.get("/config/")).json()["device_index"] == -1
    assert not settings.user_config_file.exists()  # reported, not stored
