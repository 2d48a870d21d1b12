"""A request that cannot fit in the memory the user lets the backend use is refused before
anything runs, with the estimate and the limit, and leaves nothing behind."""

from __future__ import annotations

import re

import httpx
from fastapi import FastAPI

from app.config import Settings
from tests.api import config_with, create_history, list_histories, post_generate
from tests.harness import recorded_events


async def test_a_request_beyond_the_users_memory_share_is_refused_before_it_runs(
    app: FastAPI, loaded_client: httpx.AsyncClient, settings: Settings
) -> None:
    client = loaded_client
    shares = {"gpu_scale_factor": 0.1, "ram_scale_factor": 0.1}
    assert (await client.put("/config/max-memory", json=shares)).status_code == 200
    # 16 images of 2048x2048, each upscaled 4 times: tens of GiB on any model.
    config = config_with(
        width=2048,
        height=2048,
        number_of_images=16,
        steps=150,
        hires_fix={
            "upscaler": "Lanczos",
            "upscale_factor": 4.0,
            "denoising_strength": 0.5,
            "steps": 0,
        },
    )
    history_id = await create_history(client, config)
    with recorded_events(app) as events:
        response = await post_generate(client, config, history_id)

    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    match = re.search(
        r"needs about ([\d.]+) GiB of working memory \(16 images of 2048x2048, upscaled to "
        r"8192x8192\), more than the ([\d.]+) GiB the backend may use: 10% of the",
        detail,
    )
    assert match, detail
    assert float(match.group(1)) > float(match.group(2))
    assert "ram_scale_factor" in detail
    assert "fewer or smaller images" in detail
    # Refused before the first step:
    assert [name for name, _ in events if name == "image_generation_step_end"] == []
    assert await list_histories(client) == []  # like any failed run
    assert list(settings.generated_images_dir.iterdir()) == []

    # The same model still generates what fits.
    response = await post_generate(client, config_with())
    assert response.status_code == 200, response.text
