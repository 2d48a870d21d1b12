"""Generation with LoRAs through real HTTP, on real LoRA files and the real tiny pipeline."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from fastapi import FastAPI

from app.config import Settings
from app.features.generators import runner
from tests.api import config_with, generate, image, pixels, upload_lora
from tests.checksums import loaded_pipeline_state
from tests.factories.lora_files import write_lora, write_wrong_shapes
from tests.harness import paused_at


@pytest.fixture
def lora_sources(tmp_path: Path, tiny_pipeline: StableDiffusionPipeline) -> dict[str, Path]:
    """Five different real LoRAs (Kohya and PEFT, with and without text-encoder parts)."""
    folder = tmp_path / "user-loras"
    folder.mkdir()
    specs: list[tuple[str, Any, tuple[str, ...]]] = [
        ("kohya_full", "kohya", ("unet", "text_encoder")),
        ("peft_unet", "peft", ("unet",)),
        ("kohya_unet", "kohya", ("unet",)),
        ("peft_full", "peft", ("unet", "text_encoder")),
        ("kohya_te", "kohya", ("unet", "text_encoder")),
    ]
    return {
        name: write_lora(
            folder / f"{name}.safetensors", tiny_pipeline, fmt=fmt, components=parts, seed=seed
        )
        for seed, (name, fmt, parts) in enumerate(specs, start=1)
    }


@pytest.fixture
async def lora_ids(loaded_client: httpx.AsyncClient, lora_sources: dict[str, Path]) -> list[int]:
    return [await upload_lora(loaded_client, path) for path in lora_sources.values()]


async def test_weight_zero_gives_the_base_image_and_weights_change_it(
    loaded_client: httpx.AsyncClient, lora_ids: list[int]
) -> None:
    base = await image(loaded_client)
    zero = await image(loaded_client, [{"lora_id": lora_ids[0], "weight": 0.0}])
    one = await image(loaded_client, [{"lora_id": lora_ids[0], "weight": 1.0}])
    two = await image(loaded_client, [{"lora_id": lora_ids[0], "weight": 2.0}])
    assert np.array_equal(zero, base)
    assert not np.array_equal(one, base)
    assert not np.array_equal(two, base)
    assert not np.array_equal(one, two)


@pytest.mark.parametrize("count", [1, 2, 5])
async def test_one_two_and_five_loras_apply_and_leave_the_base_model_intact(
    app: FastAPI, loaded_client: httpx.AsyncClient, lora_ids: list[int], count: int
) -> None:
    base = await image(loaded_client)
    before = await loaded_pipeline_state(app)
    loras = [{"lora_id": lora_id, "weight": 0.7} for lora_id in lora_ids[:count]]
    with_loras = await image(loaded_client, loras)
    assert not np.array_equal(with_loras, base)
    assert await loaded_pipeline_state(app) == before
    assert before[1] == 0
    assert np.array_equal(await image(loaded_client), base)


async def test_each_lora_in_a_set_has_an_effect(
    loaded_client: httpx.AsyncClient, lora_ids: list[int]
) -> None:
    first = [{"lora_id": lora_ids[0], "weight": 1.0}]
    both = [*first, {"lora_id": lora_ids[1], "weight": 1.0}]
    assert not np.array_equal(await image(loaded_client, first), await image(loaded_client, both))


async def test_logs_name_each_lora_with_its_id_and_weight(
    loaded_client: httpx.AsyncClient, lora_ids: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="app.cores.lora_engine"):
        await image(loaded_client, [{"lora_id": lora_ids[1], "weight": 0.5}])
    assert f"'peft_unet' (id {lora_ids[1]}, weight 0.5)" in caplog.text
    assert "Restored the base weights" in caplog.text or "Unloaded all LoRAs" in caplog.text


async def test_history_stores_the_loras_as_sent(
    loaded_client: httpx.AsyncClient, lora_ids: list[int]
) -> None:
    loras = [{"lora_id": lora_ids[2], "weight": 1.25}, {"lora_id": lora_ids[0], "weight": 0.05}]
    assert (await generate(loaded_client, loras)).status_code == 200
    histories = (await loaded_client.get("/histories")).json()
    assert histories[-1]["config"]["loras"] == loras


async def test_loras_apply_to_the_hires_pass(
    loaded_client: httpx.AsyncClient, lora_ids: list[int]
) -> None:
    hires = {"upscale_factor": 2, "upscaler": "Lanczos", "denoising_strength": 0.6, "steps": 4}
    lora = [{"lora_id": lora_ids[2], "weight": 1.0}]
    plain = await image(loaded_client, hires_fix=hires)
    styled = await image(loaded_client, lora, hires_fix=hires)
    assert plain.shape == styled.shape == (128, 128, 3)
    assert not np.array_equal(plain, styled)


@pytest.mark.parametrize(
    ("loras", "problem"),
    [
        ([{"lora_id": i, "weight": 1} for i in range(1, 7)], "at most 5"),
        ([{"lora_id": 1, "weight": -0.1}], "greater than or equal to 0"),
        ([{"lora_id": 1, "weight": 2.01}], "less than or equal to 2"),
        ([{"lora_id": 1}, {"lora_id": 1, "weight": 0.5}], "repeated lora_id"),
    ],
)
async def test_bad_lora_lists_are_refused_with_422(
    loaded_client: httpx.AsyncClient, loras: list[dict[str, Any]], problem: str
) -> None:
    config = config_with(loras)
    for response in (
        await loaded_client.post("/histories", json=config),
        await loaded_client.post("/generators", json={"history_id": 1, "config": config}),
    ):
        assert response.status_code == 422
        assert problem in response.text


async def test_unknown_lora_is_refused_before_anything_is_loaded(
    app: FastAPI, loaded_client: httpx.AsyncClient, lora_ids: list[int]
) -> None:
    before = await loaded_pipeline_state(app)
    response = await generate(
        loaded_client, [{"lora_id": lora_ids[0], "weight": 1}, {"lora_id": 999, "weight": 1}]
    )
    assert response.status_code == 400
    assert response.json()["detail"] == "LoRA with id 999 not found"
    assert await loaded_pipeline_state(app) == before


async def test_incompatible_lora_is_refused_and_nothing_is_left_in_the_pipeline(
    app: FastAPI,
    loaded_client: httpx.AsyncClient,
    lora_ids: list[int],
    tiny_pipeline: StableDiffusionPipeline,
    tmp_path: Path,
) -> None:
    wrong = await upload_lora(
        loaded_client, write_wrong_shapes(tmp_path / "sd15.safetensors", tiny_pipeline)
    )
    before = await loaded_pipeline_state(app)
    response = await generate(
        loaded_client, [{"lora_id": lora_ids[0], "weight": 1}, {"lora_id": wrong, "weight": 1}]
    )
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "'sd15'" in detail
    assert "768" in detail
    assert await loaded_pipeline_state(app) == before


async def test_a_failure_in_the_middle_unloads_every_adapter(
    app: FastAPI,
    loaded_client: httpx.AsyncClient,
    lora_ids: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = await image(loaded_client)
    before = await loaded_pipeline_state(app)
    calls = 0

    def crash_on_second_step(latents: Any, *_preview: Any) -> list[str]:
        # Fault injection: a crash in the middle of denoising, with 3 adapters active.
        # Nothing real fails at that point on a CPU, so a step callback raises instead.
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("simulated failure in the middle of denoising")
        return []

    monkeypatch.setattr(runner, "latents_to_preview_pngs", crash_on_second_step)
    response = await generate(
        loaded_client, [{"lora_id": lora_id, "weight": 1} for lora_id in lora_ids[:3]]
    )
    assert response.status_code == 400
    assert "simulated failure" in response.json()["detail"]
    assert calls == 2
    monkeypatch.undo()
    assert await loaded_pipeline_state(app) == before
    assert np.array_equal(await image(loaded_client), base)


async def test_concurrent_requests_get_exactly_their_own_loras(
    loaded_client: httpx.AsyncClient, lora_ids: list[int]
) -> None:
    sets = [
        [{"lora_id": lora_ids[0], "weight": 1.0}],
        [{"lora_id": lora_ids[1], "weight": 0.8}, {"lora_id": lora_ids[3], "weight": 1.5}],
        [],
        [{"lora_id": lora_ids[4], "weight": 2.0}],
    ]
    sequential = [await image(loaded_client, loras) for loras in sets]
    responses = await asyncio.gather(*(generate(loaded_client, loras) for loras in sets))
    concurrent = [(await pixels(loaded_client, response))[0] for response in responses]
    for alone, together in zip(sequential, concurrent, strict=True):
        assert np.array_equal(alone, together)


async def test_deleting_a_lora_during_its_generation_breaks_nothing(
    app: FastAPI, loaded_client: httpx.AsyncClient, lora_ids: list[int], settings: Settings
) -> None:
    lora_id = lora_ids[0]
    stored = Path((await loaded_client.get(f"/loras/{lora_id}")).json()["file_path"])
    async with paused_at(app, "image_generation_step_end") as paused:
        generation = asyncio.create_task(
            generate(loaded_client, [{"lora_id": lora_id, "weight": 1.0}], steps=3)
        )
        await paused.wait()  # mid-denoising, with the LoRA applied
        deleted = await loaded_client.delete(f"/loras/{lora_id}")
        assert deleted.status_code == 200
        assert not generation.done()
    response = await generation
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == 1
    assert not stored.exists()
    assert (await loaded_client.get(f"/loras/{lora_id}")).status_code == 404
    leftovers = [p.name for p in settings.loras_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert (await loaded_pipeline_state(app))[1] == 0


async def test_a_cancelled_generation_still_restores_the_base_model(
    app: FastAPI, loaded_client: httpx.AsyncClient, lora_ids: list[int], settings: Settings
) -> None:
    before = await loaded_pipeline_state(app)
    async with paused_at(app, "image_generation_step_end") as paused:
        generation = asyncio.create_task(
            generate(
                loaded_client,
                [{"lora_id": lora_id, "weight": 1.0} for lora_id in lora_ids[:3]],
                steps=3,
            )
        )
        await paused.wait()  # mid-denoising, with three LoRAs fused
        generation.cancel()  # the client went away in the middle of the generation
        paused.release()
        with pytest.raises(asyncio.CancelledError):
            await generation
    # pipeline_state waits for the lock: the worker finished and cleaned up first.
    assert await loaded_pipeline_state(app) == before
    assert [p.name for p in settings.loras_dir.iterdir() if p.name.startswith(".")] == []
    assert list(settings.generated_images_dir.iterdir()) == []


async def test_a_prepared_lora_is_not_read_from_disk_again(
    loaded_client: httpx.AsyncClient, lora_ids: list[int]
) -> None:
    loras = [{"lora_id": lora_ids[0], "weight": 1.0}]
    first = await image(loaded_client, loras)
    stored = Path((await loaded_client.get(f"/loras/{lora_ids[0]}")).json()["file_path"])
    stored.write_bytes(b"")  # any read of the file would now fail the request
    assert np.array_equal(await image(loaded_client, loras), first)
