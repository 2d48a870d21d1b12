"""Per-component LoRA weights: each override changes exactly the component it names."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from app.cores.lora_engine import LoRACache, LoRARequest
from app.cores.model_manager.pipeline_manager import PipelineManager
from tests.api import generate, pixels
from tests.api import upload_lora as upload
from tests.factories.lora_files import write_lora


def _copy_keeping(source: Path, target: Path, keep: Callable[[str], bool]) -> Path:
    """A copy of a Kohya LoRA with only some of its layers (and their alphas)."""
    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if keep(key)}  # noqa: SIM118
        metadata = handle.metadata()
    save_file(tensors, str(target), metadata=metadata)
    return target


# ``tiny_pipeline`` is typed ``Any``: diffusers leaves most of a pipeline's attributes (the LoRA
# loader's methods, ``__call__``) unannotated.
@pytest.fixture
def lora_parts(tmp_path: Path, tiny_pipeline: Any) -> dict[str, Path]:
    full = write_lora(
        tmp_path / "full.safetensors",
        tiny_pipeline,
        fmt="kohya",
        components=("unet", "text_encoder"),
        seed=21,
    )
    return {
        "full": full,
        "unet_only": _copy_keeping(
            full, tmp_path / "unet_only.safetensors", lambda key: key.startswith("lora_unet_")
        ),
        "text_encoder_only": _copy_keeping(
            full, tmp_path / "te_only.safetensors", lambda key: key.startswith("lora_te_")
        ),
    }


async def test_text_encoder_weight_zero_equals_the_unet_only_copy_and_conversely(
    loaded_client: httpx.AsyncClient, lora_parts: dict[str, Path]
) -> None:
    ids = {name: await upload(loaded_client, path) for name, path in lora_parts.items()}

    async def image(loras: list[dict[str, Any]]) -> np.ndarray:
        return (await pixels(loaded_client, await generate(loaded_client, loras)))[0]

    full_unet_only = await image(
        [{"lora_id": ids["full"], "weight": 1.4, "text_encoder_weight": 0}]
    )
    unet_copy = await image([{"lora_id": ids["unet_only"], "weight": 1.4}])
    assert np.array_equal(full_unet_only, unet_copy)

    full_te_only = await image([{"lora_id": ids["full"], "weight": 0.7, "unet_weight": 0}])
    te_copy = await image([{"lora_id": ids["text_encoder_only"], "weight": 0.7}])
    assert np.array_equal(full_te_only, te_copy)

    everything = await image([{"lora_id": ids["full"], "weight": 1.0}])
    assert not np.array_equal(everything, unet_copy)
    assert not np.array_equal(everything, te_copy)
    assert not np.array_equal(unet_copy, te_copy)


async def test_overrides_are_stored_as_sent_and_written_as_a1111_tokens(
    loaded_client: httpx.AsyncClient, lora_parts: dict[str, Path]
) -> None:
    lora_id = await upload(loaded_client, lora_parts["full"])
    loras = [{"lora_id": lora_id, "weight": 0.8, "unet_weight": 1.25}]
    response = await generate(loaded_client, loras)
    assert response.status_code == 200
    assert (await loaded_client.get("/histories")).json()[-1]["config"]["loras"] == loras
    png = await loaded_client.get(f"/{response.json()['items'][0]['path']}")
    info = Image.open(io.BytesIO(png.content)).info["parameters"]
    assert "<lora:full:0.8:1.25>" in info  # A1111: <lora:NAME:TE:UNET>


@pytest.mark.parametrize("field", ["unet_weight", "text_encoder_weight"])
@pytest.mark.parametrize("value", [-0.5, 2.5])
async def test_out_of_range_component_weights_are_refused(
    loaded_client: httpx.AsyncClient, field: str, value: float
) -> None:
    config = {"prompt": "x", "loras": [{"lora_id": 1, "weight": 1, field: value}]}
    response = await loaded_client.post("/histories", json=config)
    assert response.status_code == 422
    assert field in response.text


@pytest.mark.parametrize("cache", [True, False], ids=["engine", "diffusers"])
def test_both_lora_paths_honour_component_weights(
    tiny_pipeline: Any, lora_parts: dict[str, Path], cache: bool
) -> None:
    """The engine's fusion (cache on) and Plan 006's diffusers adapters (cache off) give each
    component its own weight."""
    lora_cache = LoRACache(16, 1 << 30) if cache else LoRACache(0, 0)
    manager = PipelineManager(tiny_pipeline, "tiny", torch.device("cpu"), lora_cache=lora_cache)
    loads = 0
    load_lora_weights = tiny_pipeline.load_lora_weights

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        nonlocal loads
        loads += 1
        return load_lora_weights(*args, **kwargs)

    tiny_pipeline.load_lora_weights = counting_load  # counts calls; the real loader runs

    def render(
        path: Path, *, unet_weight: float | None = None, text_encoder_weight: float | None = None
    ) -> np.ndarray:
        request = LoRARequest(
            id=1,
            name=path.stem,
            path=path,
            content_key=path.stem,
            unet_weight=unet_weight,
            text_encoder_weight=text_encoder_weight,
        )
        with manager.apply_loras([request]):
            result = tiny_pipeline(
                "a red fox",
                num_inference_steps=3,
                height=64,
                width=64,
                generator=torch.Generator().manual_seed(5),
                output_type="np",
            )
        images: np.ndarray = result.images
        return images

    unet_only = render(lora_parts["unet_only"])
    text_encoder_only = render(lora_parts["text_encoder_only"])
    assert np.array_equal(render(lora_parts["full"], text_encoder_weight=0.0), unet_only)
    assert np.array_equal(render(lora_parts["full"], unet_weight=0.0), text_encoder_only)
    assert not np.array_equal(render(lora_parts["full"]), unet_only)
    assert not np.array_equal(unet_only, text_encoder_only)
    assert loads == (0 if cache else 5)
