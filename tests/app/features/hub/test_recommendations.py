"""GET /models/recommendations: the curated carousel and the default chosen for the machine."""

from __future__ import annotations

import json

import httpx
import pydantic
import pytest
import torch

from app.features.config.schemas import UserConfig
from app.features.hardware.service import list_gpus, total_ram
from app.features.hub.recommendations import (
    CATALOGUE,
    CATALOGUE_FILE,
    Catalogue,
    parse_catalogue,
    recommend,
)

GiB = 1024**3
SECTION_IDS = ["high-performance", "standard", "lightweight"]
MODEL_FIELDS = {
    "id",
    "name",
    "description",
    "memory_requirement_gb",
    "model_size",
    "tags",
    "is_recommended",
}
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD_TURBO = "stabilityai/sd-turbo"


def shares(gpu: float = 0.5, ram: float = 0.5) -> UserConfig:
    return UserConfig(gpu_scale_factor=gpu, ram_scale_factor=ram)


async def test_response_has_the_contract_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/models/recommendations")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"sections", "default_section", "default_selected_id"}
    assert [section["id"] for section in body["sections"]] == SECTION_IDS
    for section in body["sections"]:
        assert set(section) == {"id", "name", "description", "is_recommended", "models"}
        assert isinstance(section["name"], str)
        assert section["name"]
        assert isinstance(section["description"], str)
        assert section["description"]
        assert section["is_recommended"] is (section["id"] == body["default_section"])
        assert section["models"]
        for model in section["models"]:
            assert set(model) == MODEL_FIELDS
            assert isinstance(model["id"], str)
            assert "/" in model["id"]
            assert isinstance(model["name"], str)
            assert model["name"]
            assert isinstance(model["description"], str)
            assert model["description"]
            assert type(model["memory_requirement_gb"]) is int
            assert model["memory_requirement_gb"] > 0
            assert isinstance(model["model_size"], str)
            assert model["model_size"].endswith(" GB")
            assert all(isinstance(tag, str) for tag in model["tags"])
            assert isinstance(model["is_recommended"], bool)
    assert body["default_section"] in SECTION_IDS
    default = next(s for s in body["sections"] if s["id"] == body["default_section"])
    assert body["default_selected_id"] in [model["id"] for model in default["models"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="expects a machine without CUDA")
async def test_machine_without_cuda_opens_at_lightweight(client: httpx.AsyncClient) -> None:
    body = (await client.get("/models/recommendations")).json()
    assert body["default_section"] == "lightweight"
    assert body["default_selected_id"] == SD_TURBO


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_cuda_machine_is_judged_by_its_primary_gpu(client: httpx.AsyncClient) -> None:
    body = (await client.get("/models/recommendations")).json()
    expected = recommend(CATALOGUE, list_gpus()[0].memory, total_ram(), UserConfig())
    assert body == expected.model_dump(mode="json")


async def test_choosing_the_cpu_in_the_ui_means_lightweight(client: httpx.AsyncClient) -> None:
    response = await client.put("/config/device", json={"device_index": -1})
    assert response.status_code == 200, response.text
    body = (await client.get("/models/recommendations")).json()
    assert body["default_section"] == "lightweight"
    assert body["default_selected_id"] == SD_TURBO


def test_cpu_only_machine_gets_a_fast_lightweight_model() -> None:
    result = recommend(CATALOGUE, None, 16 * GiB, shares())
    assert (result.default_section, result.default_selected_id) == ("lightweight", SD_TURBO)
    # Plenty of RAM still means minutes per SDXL image on a CPU: lightweight all the same.
    result = recommend(CATALOGUE, None, 128 * GiB, shares(ram=1.0))
    assert (result.default_section, result.default_selected_id) == ("lightweight", SD_TURBO)


def test_8_gb_gpu_gets_standard() -> None:
    for share in (0.5, 1.0):  # 4 GiB fits SD 1.5; 8 GiB is short of SDXL's 12
        result = recommend(CATALOGUE, 8 * GiB, 16 * GiB, shares(gpu=share))
        assert (result.default_section, result.default_selected_id) == ("standard", SD15)


def test_24_gb_gpu_at_full_share_gets_sdxl() -> None:
    result = recommend(CATALOGUE, 24 * GiB, 32 * GiB, shares(gpu=1.0))
    assert (result.default_section, result.default_selected_id) == ("high-performance", SDXL)
    assert [s.is_recommended for s in result.sections] == [True, False, False]


def test_24_gb_gpu_at_a_low_share_gets_a_smaller_model() -> None:
    result = recommend(CATALOGUE, 24 * GiB, 32 * GiB, shares(gpu=0.3))  # 7.2 GiB
    assert (result.default_section, result.default_selected_id) == ("standard", SD15)


def test_gpu_too_small_for_anything_gets_the_smallest_lightweight_model() -> None:
    result = recommend(CATALOGUE, 2 * GiB, 64 * GiB, shares(gpu=1.0))
    assert (result.default_section, result.default_selected_id) == ("lightweight", SD_TURBO)


def test_catalogue_entries_are_well_formed() -> None:
    assert [section.id for section in CATALOGUE.sections] == SECTION_IDS
    for section in CATALOGUE.sections:
        assert 1 <= sum(model.is_recommended for model in section.models) <= 2
        for model in section.models:
            owner, _, name = model.id.partition("/")
            assert owner
            assert name
            assert model.memory_requirement_gb > 0
            assert model.model_size.strip()
    # Less capable sections never need more memory for their picks.
    needs = [
        min(m.memory_requirement_gb for m in section.models if m.is_recommended)
        for section in CATALOGUE.sections
    ]
    assert needs == sorted(needs, reverse=True)


def _catalogue_json() -> dict[str, object]:
    raw: dict[str, object] = json.loads(CATALOGUE_FILE.read_text(encoding="utf-8"))
    return raw


@pytest.mark.parametrize(
    "breakage",
    ["sections out of order", "no recommended model", "section flag set", "bad repo id"],
)
def test_a_broken_catalogue_is_refused(breakage: str) -> None:
    raw = _catalogue_json()
    sections = raw["sections"]
    assert isinstance(sections, list)
    if breakage == "sections out of order":
        sections.reverse()
    elif breakage == "no recommended model":
        for model in sections[0]["models"]:
            model["is_recommended"] = False
    elif breakage == "section flag set":
        sections[1]["is_recommended"] = True
    else:
        sections[2]["models"][0]["id"] = "not-a-repo-id"
    with pytest.raises(pydantic.ValidationError):
        parse_catalogue(json.dumps(raw))
    assert isinstance(parse_catalogue(CATALOGUE_FILE.read_bytes()), Catalogue)
