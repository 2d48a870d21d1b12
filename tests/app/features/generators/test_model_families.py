"""Every model family through the same API and the same UI config (issue 14): SD 2.x
(v-prediction), SDXL, SD3 and FLUX.1 dev and schnell, at tiny sizes built from configs.
SD 1.x is the embedded model, covered everywhere else."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from app.cores.model_manager.model_family import ModelFamily
from app.database import crud
from app.features.generators.samplers import Sampler, flow_matching_samplers
from tests.api import fetch_png, generate, pixels
from tests.factories.family_models import Family, build_family_pipeline
from tests.factories.trainer_loras import TrainerFormat, write_trainer_lora

FAMILIES: list[Family] = ["sd2", "sdxl", "sd3", "flux-dev", "flux-schnell"]
FLOW_MATCHING: set[Family] = {"sd3", "flux-dev", "flux-schnell"}
SIZE = {"width": 64, "height": 64, "steps": 2}
TINY_FAMILY: dict[Family, str] = {
    "sd2": "tiny-sd2",
    "sdxl": "tiny-sdxl",
    "sd3": "tiny-sd3",
    "flux-dev": "tiny-flux",
    "flux-schnell": "tiny-flux",
}


@pytest.fixture(params=FAMILIES)
async def family(
    request: pytest.FixtureRequest,
    app: FastAPI,
    client: httpx.AsyncClient,
    family_model_dir: Callable[[str], Path],
) -> Family:
    """The family's tiny model, listed like a downloaded one and loaded."""
    name: Family = request.param
    model_id = f"tiny/{name}"
    async with app.state.session_factory() as session:
        await crud.upsert_model(session, model_id, str(family_model_dir(name)))
        await session.commit()
    loaded = await client.post("/models/load", json={"model_id": model_id})
    assert loaded.status_code == 200, loaded.text
    body = loaded.json()
    assert isinstance(body["sample_size"], int)
    # Each tiny model is its family's tiny variant, with the evidence for it.
    assert body["family"] == TINY_FAMILY[name], body["family_evidence"]
    assert body["family_evidence"]
    return name


async def test_generates_with_previews_and_the_same_seed_gives_the_same_pixels(
    app: FastAPI, client: httpx.AsyncClient, family: Family
) -> None:
    previews: list[dict[str, Any]] = []
    remove = app.state.events.add_listener(
        lambda name, data: previews.append(data) if name == "image_generation_step_end" else None
    )
    try:
        first = await generate(client, **SIZE, seed=11)
    finally:
        remove()
    second = await generate(client, **SIZE, seed=11)
    [a], [b] = await pixels(client, first), await pixels(client, second)
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert len(previews) == SIZE["steps"]
    for preview in previews:  # latent resolution, 1/8 of the image (FLUX's unpacked)
        shown = Image.open(io.BytesIO(base64.b64decode(preview["image_base64"])))
        assert shown.size == (8, 8)
    image = await fetch_png(client, first.json()["items"][0]["path"])
    assert f"Model: tiny/{family}" in image.info["parameters"]
    assert "Model hash: " in image.info["parameters"]


async def test_every_sampler_runs_or_is_refused_naming_those_that_do(
    client: httpx.AsyncClient, family: Family
) -> None:
    working = set(flow_matching_samplers()) if family in FLOW_MATCHING else set(Sampler)
    for sampler in Sampler:
        response = await generate(client, **SIZE, seed=3, sampler=sampler.value)
        if sampler in working:
            assert response.status_code == 200, f"{sampler}: {response.text}"
        else:
            assert response.status_code == 400, f"{sampler}: {response.text}"
            detail = response.json()["detail"]
            assert "flow-matching" in detail
            assert all(s.value in detail for s in flow_matching_samplers())


async def test_hires_fix_runs(client: httpx.AsyncClient, family: Family) -> None:
    hires = {"upscale_factor": 2, "upscaler": "Lanczos", "denoising_strength": 0.5, "steps": 2}
    response = await generate(client, **SIZE, seed=5, hires_fix=hires)
    [image] = await pixels(client, response)
    assert image.shape == (128, 128, 3)


async def test_what_cfg_scale_and_negative_prompt_mean_per_family(
    client: httpx.AsyncClient, family: Family
) -> None:
    """CFG families use both; FLUX.1 dev feeds cfg_scale to its guidance embedding and runs
    without a negative prompt; FLUX.1 schnell uses neither (README, "Model families")."""

    async def image(**fields: Any) -> np.ndarray:
        [pixels_] = await pixels(client, await generate(client, **SIZE, seed=9, **fields))
        return pixels_

    base = await image(cfg_scale=4.0, negative_prompt="")
    cfg_changes = not np.array_equal(base, await image(cfg_scale=1.5, negative_prompt=""))
    negative_changes = not np.array_equal(base, await image(cfg_scale=4.0, negative_prompt="fog"))
    assert cfg_changes is (family != "flux-schnell")
    assert negative_changes is (family not in ("flux-dev", "flux-schnell"))


# The formats each family's LoRAs are published in (tests/factories/trainer_loras.py).
TRAINER_FORMATS: dict[Family, list[TrainerFormat]] = {
    "sd2": ["kohya", "lycoris-loha", "peft"],
    "sdxl": ["kohya", "lycoris-lokr", "peft"],
    "sd3": ["kohya", "peft"],
    "flux-dev": ["kohya", "bfl", "xlabs", "peft"],
    "flux-schnell": ["kohya", "xlabs"],
}


async def test_loras_in_the_family_formats_upload_classify_and_apply(
    client: httpx.AsyncClient, family: Family, tmp_path: Path
) -> None:
    """Each family's LoRAs, as their trainers write them: classified as that family, applied
    (the image changes); a LoRA of another family is refused naming both families."""
    pipeline = build_family_pipeline(family)  # family_model_dir's weights: the same seed
    base = await pixels(client, await generate(client, **SIZE, seed=4))
    for index, trainer_format in enumerate(TRAINER_FORMATS[family]):
        path = tmp_path / f"{family}-{trainer_format}.safetensors"
        write_trainer_lora(pipeline, family, trainer_format, path, seed=index)
        uploaded = await client.post("/loras/upload", json={"file_path": str(path)})
        assert uploaded.status_code == 201, uploaded.text
        info = uploaded.json()
        assert info["base_model"] == TINY_FAMILY[family], (trainer_format, info)
        assert info["compatible"] is True
        denoiser = "unet" if family in ("sd2", "sdxl") else "transformer"
        assert denoiser in info["components"], (trainer_format, info["components"])
        loras = [{"lora_id": info["id"], "weight": 1.0}]
        response = await generate(client, loras, **SIZE, seed=4)
        assert response.status_code == 200, response.text
        assert not np.array_equal(await pixels(client, response), base), trainer_format
    other: Family = "sd2" if family != "sd2" else "sdxl"
    path = tmp_path / "other.safetensors"
    write_trainer_lora(build_family_pipeline(other), other, "kohya", path)
    uploaded = await client.post("/loras/upload", json={"file_path": str(path)})
    assert uploaded.status_code == 201, uploaded.text
    refused = await generate(client, [{"lora_id": uploaded.json()["id"]}], **SIZE)
    assert refused.status_code == 400
    detail = refused.json()["detail"]
    other_name = ModelFamily(TINY_FAMILY[other]).display_name
    assert other_name in detail
    assert ModelFamily(TINY_FAMILY[family]).display_name in detail
