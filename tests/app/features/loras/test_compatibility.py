"""Which LoRAs fit the loaded model, through HTTP: the base model shown per LoRA, the
``compatible`` flag and filter, refusal of another family's LoRA before the pipeline is
touched, every LoRA format that runs on the tiny model (LyCORIS variants included), and
refusal of the variants no supported path applies, at upload."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from safetensors.torch import save_file

from app.config import Settings
from app.cores.model_manager.model_family import ModelFamily
from tests.api import generate, image, list_loras, load_model, upload, upload_ok
from tests.checksums import loaded_pipeline_state
from tests.factories.family_loras import write_family_lora
from tests.factories.lora_files import write_lora, write_wrong_shapes


async def listed(client: httpx.AsyncClient, **params: str) -> dict[str, dict[str, Any]]:
    """``GET /loras`` by LoRA name."""
    return {lora["name"]: lora for lora in await list_loras(client, **params)}


@pytest.fixture
def family_files(user_dir: Path, tiny_pipeline: Any) -> dict[str, Path]:
    files = {
        f"{family}_{fmt}": write_family_lora(
            user_dir / f"{family}_{fmt}.safetensors", family, fmt=fmt
        )
        for family in ("sd1", "sd2", "sdxl", "sd3", "flux")
        for fmt in ("kohya", "peft")
    }
    files["tiny"] = write_lora(user_dir / "tiny.safetensors", tiny_pipeline, seed=5)
    files["odd"] = write_wrong_shapes(user_dir / "odd.safetensors", tiny_pipeline)
    return files


async def test_base_model_and_compatibility_follow_the_loaded_model(
    app: FastAPI, client: httpx.AsyncClient, family_files: dict[str, Path]
) -> None:
    for path in family_files.values():
        await upload_ok(client, path)

    before = await listed(client)
    for name, info in before.items():
        expected = name.split("_")[0] if name not in ("tiny", "odd") else name
        assert info["base_model"] == {"odd": "unknown"}.get(expected, expected), info
        assert info["compatible"] is None  # no model loaded
    assert before["sdxl_kohya"]["components"] == ["unet", "text_encoder", "text_encoder_2"]
    assert before["flux_kohya"]["components"] == ["transformer", "text_encoder"]
    assert before["sd3_peft"]["components"] == ["transformer"]
    # Nothing is known to be incompatible while no model is loaded.
    assert (await listed(client, compatible_with_loaded="true")).keys() == before.keys()
    assert await listed(client, compatible_with_loaded="false") == {}

    await load_model(client)
    assert app.state.model_manager.loaded_family is ModelFamily.TINY

    after = await listed(client)
    assert after["tiny"]["compatible"] is True
    assert after["odd"]["compatible"] is None
    others = {name for name in after if name not in ("tiny", "odd")}
    assert all(after[name]["compatible"] is False for name in others)
    assert (await listed(client, compatible_with_loaded="true")).keys() == {"tiny", "odd"}
    assert (await listed(client, compatible_with_loaded="false")).keys() == others
    lora_id = after["sdxl_kohya"]["id"]
    assert (await client.get(f"/loras/{lora_id}")).json()["compatible"] is False

    response = await client.get("/loras?compatible_with_loaded=maybe")
    assert response.status_code == 422


async def test_another_familys_lora_is_refused_before_the_pipeline_is_touched(
    app: FastAPI,
    loaded_client: httpx.AsyncClient,
    family_files: dict[str, Path],
) -> None:
    good = await upload_ok(loaded_client, family_files["tiny"])
    sdxl = await upload_ok(loaded_client, family_files["sdxl_kohya"])
    flux = await upload_ok(loaded_client, family_files["flux_peft"])
    before = await loaded_pipeline_state(app)

    for foreign in (sdxl, flux):
        # Emptied on disk: reading it for a size check would fail with another message.
        Path(foreign["file_path"]).write_bytes(b"")
    for other, family in ((sdxl, "SDXL"), (flux, "FLUX.1")):
        loras = [{"lora_id": good["id"], "weight": 1}, {"lora_id": other["id"], "weight": 0.5}]
        response = await generate(loaded_client, loras)
        assert response.status_code == 400, response.text
        assert response.json()["detail"].startswith(
            f"LoRA '{other['name']}' was made for {family}; "
            "the loaded model is the tiny embedded test model."
        )
    assert await loaded_pipeline_state(app) == before


async def test_a_lora_of_unknown_family_is_still_size_checked(
    loaded_client: httpx.AsyncClient, family_files: dict[str, Path]
) -> None:
    odd = await upload_ok(loaded_client, family_files["odd"])
    assert (odd["base_model"], odd["compatible"]) == ("unknown", None)
    response = await generate(loaded_client, [{"lora_id": odd["id"], "weight": 1}])
    assert response.status_code == 400
    assert "768-wide cross-attention" in response.json()["detail"]


async def test_model_family_and_hash_are_known_once_loaded(
    app: FastAPI, client: httpx.AsyncClient, settings: Settings
) -> None:
    manager = app.state.model_manager
    assert (manager.loaded_family, manager.loaded_model_hash) == (None, None)
    await load_model(client)
    unet = settings.cache_dir / "models" / "embedded--tiny-sd" / "unet"
    weights = (unet / "diffusion_pytorch_model.safetensors").read_bytes()
    assert manager.loaded_model_hash == hashlib.sha256(weights).hexdigest()[:10]
    assert manager.loaded_family is ModelFamily.TINY


# ---------------------------------------------------------------------------------------------
# Formats from the wild


WORKING_FORMATS: dict[str, dict[str, Any]] = {
    "kohya unet": {"fmt": "kohya"},
    "kohya unet+te": {"fmt": "kohya", "components": ("unet", "text_encoder")},
    "kohya te only": {"fmt": "kohya", "components": ("text_encoder",), "scale": 3.0},
    "kohya locon": {"fmt": "kohya", "include_conv": True},
    "peft unet+te": {"fmt": "peft", "components": ("unet", "text_encoder")},
    "peft no text_model prefix": {
        "fmt": "peft",
        "components": ("unet", "text_encoder"),
        "text_model_prefix": False,
    },
    "peft dora": {"fmt": "peft", "dora": True},
    "peft alpha metadata": {"fmt": "peft", "alpha": 2.0},
    "legacy processor unet+te": {"fmt": "diffusers_legacy", "components": ("unet", "text_encoder")},
}


async def test_every_format_the_tiny_model_can_run_uploads_and_generates(
    loaded_client: httpx.AsyncClient, tiny_pipeline: Any, user_dir: Path
) -> None:
    base = await image(loaded_client)
    for seed, (name, options) in enumerate(WORKING_FORMATS.items(), start=10):
        path = write_lora(user_dir / f"{name}.safetensors", tiny_pipeline, seed=seed, **options)
        info = await upload_ok(loaded_client, path)
        assert info["base_model"] == "tiny", name
        assert info["compatible"] is True, name
        styled = await image(loaded_client, [{"lora_id": info["id"], "weight": 1.0}])
        assert not np.array_equal(styled, base), f"{name} changed nothing"


_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 32 -> 32 channels, 3x3
LYCORIS: dict[str, tuple[dict[str, tuple[int, ...]], str]] = {
    "loha": (
        {
            f"{_Q}.hada_w1_a": (32, 4),
            f"{_Q}.hada_w1_b": (4, 32),
            f"{_Q}.hada_w2_a": (32, 4),
            f"{_Q}.hada_w2_b": (4, 32),
            f"{_Q}.alpha": (),
        },
        "loha",
    ),
    "loha tucker": (
        {
            f"{_CONV}.hada_t1": (4, 4, 3, 3),
            f"{_CONV}.hada_w1_a": (4, 32),
            f"{_CONV}.hada_w1_b": (4, 32),
            f"{_CONV}.hada_t2": (4, 4, 3, 3),
            f"{_CONV}.hada_w2_a": (4, 32),
            f"{_CONV}.hada_w2_b": (4, 32),
        },
        "loha",
    ),
    "lokr": ({f"{_Q}.lokr_w1": (4, 4), f"{_Q}.lokr_w2": (8, 8)}, "lokr"),
    "lokr low rank": (
        {f"{_Q}.lokr_w1": (4, 4), f"{_Q}.lokr_w2_a": (8, 2), f"{_Q}.lokr_w2_b": (2, 8)},
        "lokr",
    ),
    "kohya dora": (
        {
            f"{_Q}.lora_down.weight": (4, 32),
            f"{_Q}.lora_up.weight": (32, 4),
            f"{_Q}.dora_scale": (1, 32),
        },
        "dora",
    ),
    "tucker locon": (
        {
            f"{_CONV}.lora_down.weight": (4, 32, 1, 1),
            f"{_CONV}.lora_mid.weight": (4, 4, 3, 3),
            f"{_CONV}.lora_up.weight": (32, 4, 1, 1),
        },
        "locon",
    ),
    "full diff": ({f"{_Q}.diff": (32, 32), f"{_Q}.diff_b": (32,)}, "full"),
}
"""LyCORIS layers on the tiny model's shapes, as LyCORIS names them (Kohya module names)."""


async def test_lycoris_variants_upload_and_change_the_image(
    loaded_client: httpx.AsyncClient, user_dir: Path
) -> None:
    base = await image(loaded_client)
    generator = torch.Generator().manual_seed(5)
    for name, (shapes, network_type) in LYCORIS.items():
        tensors = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
        if f"{_Q}.dora_scale" in tensors:  # a magnitude near the base weight's column norms
            tensors[f"{_Q}.dora_scale"] = tensors[f"{_Q}.dora_scale"].abs() + 1.0
        path = user_dir / f"{name}.safetensors"
        save_file(tensors, str(path))
        info = await upload_ok(loaded_client, path)
        assert info["network_type"] == network_type, name
        assert info["compatible"] is True, name
        styled = await image(loaded_client, [{"lora_id": info["id"], "weight": 1.0}])
        assert not np.array_equal(styled, base), f"{name} changed nothing"


_PEFT_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNSUPPORTED: dict[str, tuple[dict[str, tuple[int, ...]], str]] = {
    "peft_ia3": ({f"{_PEFT_Q}.ia3_l": (32,)}, "PEFT (IA)³"),
    "boft": ({f"{_PEFT_Q}.boft_R": (1, 4, 8, 8)}, "BOFT"),
    "vera": ({f"{_PEFT_Q}.vera_lambda_b": (32,)}, "VeRA"),
}


async def test_variants_that_cannot_run_are_refused_at_upload_by_name(
    client: httpx.AsyncClient, user_dir: Path
) -> None:
    for name, (shapes, variant) in UNSUPPORTED.items():
        path = user_dir / f"{name}.safetensors"
        save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
        response = await upload(client, path)
        assert response.status_code == 400, (name, response.text)
        detail = response.json()["detail"]
        assert variant in detail, (name, detail)
        assert "not supported" in detail, (name, detail)
    assert await list_loras(client) == []
