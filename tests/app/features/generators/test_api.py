"""POST /generators end to end: the real tiny pipeline, real PNG files served over HTTP.

Generations are kept tiny (64x64, 2-3 steps) except where a test needs one that lasts.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from app.config import EMBEDDED_MODEL_ID, Settings
from app.cores.model_manager.model_manager import ModelManager
from app.cores.model_manager.pipeline_manager import PipelineManager
from tests.api import (
    config_with,
    create_history,
    fetch_png,
    generated,
    list_histories,
    post_generate,
    rgb,
)
from tests.contract import SAMPLER_VALUES
from tests.harness import paused_at, wait_until

FAST = config_with(prompt="a red fox", steps=2)
"""The base config in two steps: these tests are about the requests, not the picture."""


def _generated_files(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.generated_images_dir.iterdir())


async def test_samplers_are_listed(client: httpx.AsyncClient) -> None:
    response = await client.get("/generators/samplers")
    assert response.status_code == 200
    samplers = response.json()
    assert [s["value"] for s in samplers] == SAMPLER_VALUES
    assert all(s["name"] and s["description"] for s in samplers)


async def test_images_are_saved_served_and_linked_to_the_history(
    loaded_client: httpx.AsyncClient, settings: Settings
) -> None:
    config = {**FAST, "seed": 1234, "negative_prompt": "blurry"}
    history_id = await create_history(loaded_client, config)
    response = await post_generate(loaded_client, config, history_id)
    assert response.status_code == 200, response.text
    body = response.json()
    [item] = body["items"]
    assert body["nsfw_content_detected"] == [False]
    assert body["seeds"] == [1234]

    path, file_name = item["path"], item["file_name"]
    assert re.fullmatch(r"static/generated_images/[^/]+\.png", path)  # no leading slash
    assert path == f"static/generated_images/{file_name}.png"
    assert _generated_files(settings) == [f"{file_name}.png"]

    image = await fetch_png(loaded_client, path)
    assert image.size == (64, 64)
    assert image.mode == "RGB"
    parameters = image.info["parameters"]
    assert parameters.splitlines()[0] == "a red fox"
    assert "Negative prompt: blurry" in parameters
    assert "Seed: 1234" in parameters
    assert "Steps: 2" in parameters
    assert "Size: 64x64" in parameters
    assert "Sampler: Euler," in parameters  # BASE_CONFIG's sampler
    assert f"Model: {EMBEDDED_MODEL_ID}" in parameters
    assert rgb(image).std() > 0  # a real image, not a blank one

    [history] = await list_histories(loaded_client)
    assert history["id"] == history_id
    [linked] = history["generated_images"]
    assert linked["path"] == path
    assert linked["file_name"] == file_name
    assert linked["history_id"] == history_id
    assert linked["is_nsfw"] is False
    assert linked["seed"] == 1234


async def test_same_seed_gives_the_same_pixels(loaded_client: httpx.AsyncClient) -> None:
    images = []
    for seed in (99, 99, 100):
        [item] = (await generated(loaded_client, {**FAST, "seed": seed}))["items"]
        images.append(rgb(await fetch_png(loaded_client, item["path"])))
    first, again, other = images
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


async def test_random_seed_is_recorded_and_reproduces_the_image(
    loaded_client: httpx.AsyncClient,
) -> None:
    body = await generated(loaded_client, {**FAST, "seed": -1})
    [seed] = body["seeds"]
    assert 0 <= seed < 2**32
    [history] = await list_histories(loaded_client)
    assert history["config"]["seed"] == -1  # the request is stored as sent
    assert [i["seed"] for i in history["generated_images"]] == [seed]
    random_image = await fetch_png(loaded_client, body["items"][0]["path"])
    assert f"Seed: {seed}," in random_image.info["parameters"]

    [item] = (await generated(loaded_client, {**FAST, "seed": seed}))["items"]
    assert np.array_equal(rgb(random_image), rgb(await fetch_png(loaded_client, item["path"])))


async def test_batch_gives_distinct_images_with_consecutive_seeds(
    loaded_client: httpx.AsyncClient, settings: Settings
) -> None:
    body = await generated(loaded_client, {**FAST, "seed": 10, "number_of_images": 3})
    assert body["seeds"] == [10, 11, 12]
    assert body["nsfw_content_detected"] == [False] * 3
    paths = [item["path"] for item in body["items"]]
    assert len(set(paths)) == 3
    assert len(_generated_files(settings)) == 3
    pixels = [rgb(await fetch_png(loaded_client, path)) for path in paths]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.array_equal(pixels[a], pixels[b])
    [history] = await list_histories(loaded_client)
    images = history["generated_images"]
    assert [i["path"] for i in images] == paths  # batch order
    assert [i["seed"] for i in images] == [10, 11, 12]


async def test_size_is_rounded_down_to_a_multiple_of_eight(
    loaded_client: httpx.AsyncClient,
) -> None:
    body = await generated(loaded_client, {**FAST, "width": 70, "height": 79})
    image = await fetch_png(loaded_client, body["items"][0]["path"])
    assert image.size == (64, 72)
    [history] = await list_histories(loaded_client)
    assert (history["config"]["width"], history["config"]["height"]) == (70, 79)


async def test_hires_fix_doubles_the_size(loaded_client: httpx.AsyncClient) -> None:
    hires = {"upscale_factor": 2, "upscaler": "Lanczos", "denoising_strength": 0.5, "steps": 2}
    body = await generated(loaded_client, {**FAST, "seed": 5, "hires_fix": hires})
    image = await fetch_png(loaded_client, body["items"][0]["path"])
    assert image.size == (128, 128)
    parameters = image.info["parameters"]
    assert "Size: 128x128" in parameters
    assert "Hires upscale: 2.0" in parameters
    assert "Hires upscaler: Lanczos" in parameters


async def test_hires_fix_without_denoising_only_resizes(
    loaded_client: httpx.AsyncClient,
) -> None:
    config = {**FAST, "seed": 8}
    hires = {"upscale_factor": 2, "upscaler": "Lanczos", "denoising_strength": 0, "steps": 0}
    base_body = await generated(loaded_client, config)
    hires_body = await generated(loaded_client, {**config, "hires_fix": hires})
    base = await fetch_png(loaded_client, base_body["items"][0]["path"])
    upscaled = await fetch_png(loaded_client, hires_body["items"][0]["path"])
    assert upscaled.size == (128, 128)
    expected = base.resize((128, 128), Image.Resampling.LANCZOS)
    assert np.array_equal(rgb(upscaled), rgb(expected))


async def test_ai_upscaler_is_refused(loaded_client: httpx.AsyncClient, settings: Settings) -> None:
    hires = {
        "upscale_factor": 4,
        "upscaler": "RealESRGAN_x4plus",
        "denoising_strength": 0.3,
        "steps": 0,
    }
    response = await post_generate(loaded_client, {**FAST, "hires_fix": hires})
    assert response.status_code == 400
    assert "not installed" in response.json()["detail"]
    assert _generated_files(settings) == []
    # The history entry the UI made for this run is gone: an entry without images would
    # look like a run whose images went missing.
    assert await list_histories(loaded_client) == []


async def test_any_failure_inside_the_pipeline_is_a_400_with_its_reason(
    loaded_client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: a pipeline that does not take an argument raises TypeError (FLUX's
    # pipeline and clip_skip); nothing in the embedded model's own path raises one.
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise TypeError("__call__() got an unexpected keyword argument 'clip_skip'")

    kept = await create_history(loaded_client, FAST)
    assert (await post_generate(loaded_client, FAST, kept)).status_code == 200
    monkeypatch.setattr(PipelineManager, "text_to_image", refuse)
    response = await post_generate(loaded_client, FAST)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith("Generation failed (TypeError)")
    assert "clip_skip" in detail
    [history] = await list_histories(loaded_client)
    assert history["id"] == kept  # only the entry whose run made an image
    # A history entry that already has images keeps them when a later run fails.
    assert (await post_generate(loaded_client, FAST, kept)).status_code == 400
    [history] = await list_histories(loaded_client)
    assert len(history["generated_images"]) == 1


async def test_unknown_history_is_not_found(loaded_client: httpx.AsyncClient) -> None:
    response = await post_generate(loaded_client, FAST, history_id=4242)
    assert response.status_code == 404
    assert "4242" in response.json()["detail"]


async def test_generation_needs_a_loaded_model(
    loaded_client: httpx.AsyncClient, settings: Settings
) -> None:
    history_id = await create_history(loaded_client, FAST)
    assert (await loaded_client.post("/models/unload")).status_code == 200
    response = await post_generate(loaded_client, FAST, history_id)
    assert response.status_code == 400
    assert "No model is currently loaded" in response.json()["detail"]
    assert _generated_files(settings) == []


async def test_invalid_request_is_a_validation_error(loaded_client: httpx.AsyncClient) -> None:
    history_id = await create_history(loaded_client, FAST)
    for body in (
        {"config": FAST},
        {"history_id": history_id},
        {"history_id": history_id, "config": {**FAST, "width": 32}},
    ):
        assert (await loaded_client.post("/generators", json=body)).status_code == 422, body


async def test_health_answers_while_a_generation_runs(
    loaded_client: httpx.AsyncClient, app: FastAPI
) -> None:
    config = {**FAST, "steps": 3, "seed": 3}
    history_id = await create_history(loaded_client, config)
    async with paused_at(app, "image_generation_step_end") as paused:
        generation = asyncio.ensure_future(post_generate(loaded_client, config, history_id))
        await paused.wait()  # the worker is in the middle of denoising, holding the pipeline
        health = await loaded_client.get("/")
        assert health.status_code == 200
        assert not generation.done()  # the event loop served / while the pipeline worked
    assert (await generation).status_code == 200


async def test_unload_waits_for_a_running_generation(
    loaded_client: httpx.AsyncClient, app: FastAPI
) -> None:
    manager: ModelManager = app.state.model_manager
    config = {**FAST, "width": 96, "height": 96, "steps": 3, "seed": 4}
    history_id = await create_history(loaded_client, config)
    async with paused_at(app, "image_generation_step_end") as paused:
        generation = asyncio.ensure_future(post_generate(loaded_client, config, history_id))
        await paused.wait()
        unload = asyncio.ensure_future(loaded_client.post("/models/unload"))
        await wait_until(lambda: manager.unloading, what="the unload waiting for the lock")
        assert manager.loaded_model_id is not None
    # The unload's worker could only take the lock once the generation had finished with
    # the pipeline, so the generation was not cut short: it answers 200 with its image.
    response = await generation
    assert (await unload).status_code == 200
    assert response.status_code == 200, response.text
    [item] = response.json()["items"]
    assert (await fetch_png(loaded_client, item["path"])).size == (96, 96)
    assert manager.loaded_model_id is None
    assert (await loaded_client.post("/histories", json=FAST)).status_code == 400  # unloaded
