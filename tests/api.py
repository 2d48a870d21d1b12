"""The API helpers the tests share: one base generation config and the UI's request order
(``POST /histories``, then ``POST /generators`` with the same config), PNGs fetched over HTTP,
model loads, LoRA uploads and downloads, and the lists the API answers."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image

from app.config import EMBEDDED_MODEL_ID
from tests.harness import wait_until

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
JSON = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Models


async def post_load(client: httpx.AsyncClient, model_id: str = EMBEDDED_MODEL_ID) -> httpx.Response:
    return await client.post("/models/load", json={"model_id": model_id})


async def load_model(client: httpx.AsyncClient, model_id: str = EMBEDDED_MODEL_ID) -> JSON:
    """Load ``model_id`` (the embedded model by default); the answer's description."""
    response = await post_load(client, model_id)
    assert response.status_code == 200, response.text
    described: JSON = response.json()
    return described


async def downloaded_models(client: httpx.AsyncClient) -> dict[str, str]:
    """``GET /models/downloaded`` as model id -> folder."""
    rows = (await client.get("/models/downloaded")).json()
    return {row["model_id"]: row["model_dir"] for row in rows}


async def download_model(client: httpx.AsyncClient, model_id: str, **body: str) -> httpx.Response:
    """``POST /downloads``: a model from the Hub (answers once it is downloaded)."""
    return await client.post("/downloads", json={"model_id": model_id, **body})


# ---------------------------------------------------------------------------------------------
# Generation


def config_with(loras: list[JSON] | None = None, /, **overrides: Any) -> JSON:
    """``BASE_CONFIG`` changed by ``overrides``, with these LoRAs (none by default)."""
    return {**BASE_CONFIG, **overrides, "loras": loras or []}


async def create_history(client: httpx.AsyncClient, config: JSON) -> int:
    response = await client.post("/histories", json=config)
    assert response.status_code == 200, response.text
    history_id = response.json()
    assert type(history_id) is int  # a bare JSON integer, not an object
    return history_id


async def list_histories(client: httpx.AsyncClient) -> list[JSON]:
    response = await client.get("/histories")
    assert response.status_code == 200, response.text
    entries: list[JSON] = response.json()
    return entries


async def post_generate(
    client: httpx.AsyncClient, config: JSON, history_id: int | None = None
) -> httpx.Response:
    """The UI's two requests; ``history_id`` given: only the second."""
    if history_id is None:
        history_id = await create_history(client, config)
    return await client.post("/generators", json={"history_id": history_id, "config": config})


async def generate(
    client: httpx.AsyncClient, loras: list[JSON] | None = None, /, **overrides: Any
) -> httpx.Response:
    """Generate with ``BASE_CONFIG`` changed by ``overrides``."""
    return await post_generate(client, config_with(loras, **overrides))


async def generated(client: httpx.AsyncClient, config: JSON) -> JSON:
    """The answer of a generation with ``config`` that must succeed."""
    response = await post_generate(client, config)
    assert response.status_code == 200, response.text
    body: JSON = response.json()
    return body


async def fetch_png(client: httpx.AsyncClient, path: str) -> Image.Image:
    response = await client.get(f"/{path}")
    assert response.status_code == 200, path
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.format == "PNG"
    return image


def rgb(image: Image.Image) -> Pixels:
    return np.asarray(image.convert("RGB"))


async def pixels(client: httpx.AsyncClient, response: httpx.Response) -> list[Pixels]:
    """The RGB pixels of every image a ``POST /generators`` response lists."""
    assert response.status_code == 200, response.text
    return [rgb(await fetch_png(client, item["path"])) for item in response.json()["items"]]


async def image(
    client: httpx.AsyncClient, loras: list[JSON] | None = None, /, **overrides: Any
) -> Pixels:
    """The first image of a generation with ``BASE_CONFIG`` changed by ``overrides``."""
    return (await pixels(client, await generate(client, loras, **overrides)))[0]


# ---------------------------------------------------------------------------------------------
# LoRAs


async def upload(client: httpx.AsyncClient, path: Path | str) -> httpx.Response:
    """``POST /loras/upload`` of the file at ``path``, whatever the answer."""
    return await client.post("/loras/upload", json={"file_path": str(path)})


async def upload_ok(client: httpx.AsyncClient, path: Path | str) -> JSON:
    """Add a LoRA from disk; its description."""
    response = await upload(client, path)
    assert response.status_code == 201, response.text
    info: JSON = response.json()
    return info


async def upload_lora(client: httpx.AsyncClient, path: Path) -> int:
    """Add a LoRA from disk; its id."""
    lora_id: int = (await upload_ok(client, path))["id"]
    return lora_id


async def list_loras(client: httpx.AsyncClient, **params: str) -> list[JSON]:
    """``GET /loras`` (with ``params`` as the query, say ``compatible_with_loaded="true"``)."""
    response = await client.get("/loras", params=params)
    assert response.status_code == 200, response.text
    loras: list[JSON] = response.json()["loras"]
    return loras


FINISHED = {"completed", "failed", "cancelled"}
"""The states a LoRA download ends in."""


async def start_lora_download(client: httpx.AsyncClient, body: JSON) -> JSON:
    """``POST /loras/download``; the download as it starts."""
    response = await client.post("/loras/download", json=body)
    assert response.status_code == 202, response.text
    info: JSON = response.json()
    return info


async def wait_for_lora_download(
    client: httpx.AsyncClient, download_id: str, states: set[str] = FINISHED, min_bytes: int = 0
) -> JSON:
    """Ask ``GET /loras/downloads/{id}`` until its state is in ``states`` (and at least
    ``min_bytes`` arrived); the download then."""
    info: JSON = {}

    async def reached() -> bool:
        nonlocal info
        response = await client.get(f"/loras/downloads/{download_id}")
        assert response.status_code == 200, response.text
        info = response.json()
        return info["state"] in states and info["bytes_done"] >= min_bytes

    await wait_until(reached, what=lambda: f"{sorted(states)}: still {info}", interval=0.02)
    return info


async def download_lora(client: httpx.AsyncClient, body: JSON) -> JSON:
    """Start a LoRA download and wait until it finished; the download then."""
    return await wait_for_lora_download(client, (await start_lora_download(client, body))["id"])
