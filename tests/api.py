"""The API helpers the tests share: one base generation config and the UI's request order
(``POST /histories``, then ``POST /generators`` with the same config), PNGs fetched over HTTP."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image

BASE_CONFIG: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "steps": 4,
    "seed": 1234,
    "sampler": "EULER",
}
"""Small and fast on the embedded model; tests override what they are about."""

Pixels = npt.NDArray[np.uint8]


def config_with(loras: list[dict[str, Any]] | None = None, **overrides: Any) -> dict[str, Any]:
    return {**BASE_CONFIG, **overrides, "loras": loras or []}


async def create_history(client: httpx.AsyncClient, config: dict[str, Any]) -> int:
    response = await client.post("/histories", json=config)
    assert response.status_code == 200, response.text
    history_id: int = response.json()
    return history_id


async def post_generate(
    client: httpx.AsyncClient, config: dict[str, Any], history_id: int | None = None
) -> httpx.Response:
    """The UI's two requests; ``history_id`` given: only the second."""
    if history_id is None:
        history_id = await create_history(client, config)
    return await client.post("/generators", json={"history_id": history_id, "config": config})


async def generate(
    client: httpx.AsyncClient, loras: list[dict[str, Any]] | None = None, **overrides: Any
) -> httpx.Response:
    """Generate with ``BASE_CONFIG`` changed by ``overrides``."""
    return await post_generate(client, config_with(loras, **overrides))


async def fetch_png(client: httpx.AsyncClient, path: str) -> Image.Image:
    response = await client.get(f"/{path}")
    assert response.status_code == 200, path
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.format == "PNG"
    return image


async def pixels(client: httpx.AsyncClient, response: httpx.Response) -> list[Pixels]:
    """The RGB pixels of every image a ``POST /generators`` response lists."""
    assert response.status_code == 200, response.text
    images = [await fetch_png(client, item["path"]) for item in response.json()["items"]]
    return [np.asarray(image.convert("RGB")) for image in images]


async def image(
    client: httpx.AsyncClient, loras: list[dict[str, Any]] | None = None, **overrides: Any
) -> Pixels:
    """The first image of a generation with ``BASE_CONFIG`` changed by ``overrides``."""
    return (await pixels(client, await generate(client, loras, **overrides)))[0]


async def upload_lora(client: httpx.AsyncClient, path: Path) -> int:
    """Add a LoRA from disk; its id."""
    response = await client.post("/loras/upload", json={"file_path": str(path)})
    assert response.status_code == 201, response.text
    lora_id: int = response.json()["id"]
    return lora_id


async def downloaded_models(client: httpx.AsyncClient) -> dict[str, str]:
    """``GET /models/downloaded`` as model id -> folder."""
    rows = (await client.get("/models/downloaded")).json()
    return {row["model_id"]: row["model_dir"] for row in rows}
