"""The tiny family models: each loads through ``DiffusionPipeline.from_pretrained`` as its real
pipeline class and draws a 64x64 image, with the same pixels for the same seed; building is
deterministic and leaves the global torch RNG alone. Each is detected as its family's tiny
variant (``app.cores.model_manager.model_family``), whose width tables match its modules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from app.cores.model_manager.model_family import (
    ATTENTION_WIDTHS,
    CROSS_ATTENTION_FAMILIES,
    TINY_SD2_CROSS_ATTENTION_DIM,
    TINY_SDXL_CROSS_ATTENTION_DIM,
    TINY_T5_WIDTH,
    TINY_TRANSFORMER_WIDTH,
    ModelFamily,
    detect_pipeline,
)
from tests.factories.family_models import (
    FAMILIES,
    PIPELINE_CLASSES,
    SD2_TEXT_WIDTH,
    SDXL_TEXT_WIDTH,
    T5_WIDTH,
    Family,
    FamilyModelDir,
    write_family_model,
)

# What each family's users run: CFG for SD3, the embedded guidance for FLUX.1 dev, none for
# schnell (distilled); the UNet families keep the pipelines' defaults.
GENERATION: dict[Family, dict[str, Any]] = {
    "sd3": {"guidance_scale": 5.0},
    "flux-dev": {"guidance_scale": 3.5},
    "flux-schnell": {"guidance_scale": 0.0},
}


def _generate(pipeline: Any, family: Family, seed: int) -> np.ndarray:
    result = pipeline(
        "a red boat on a lake",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **GENERATION.get(family, {}),
    )
    image: np.ndarray = result.images[0]
    return image


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_family_model_loads_as_its_pipeline_and_generates(
    family: Family, family_model_dir: FamilyModelDir
) -> None:
    folder = family_model_dir(family)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASSES[family]

    pipeline = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert type(pipeline).__name__ == PIPELINE_CLASSES[family]
    pipeline.set_progress_bar_config(disable=True)

    image = _generate(pipeline, family, seed=7)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.01  # an image, not a flat colour
    np.testing.assert_array_equal(_generate(pipeline, family, seed=7), image)
    assert np.abs(_generate(pipeline, family, seed=8) - image).mean() > 1e-3


@pytest.mark.parametrize(
    ("family", "config", "expected"),
    [
        ("sd2", "scheduler/scheduler_config.json", {"prediction_type": "v_prediction"}),
        ("sd2", "unet/config.json", {"use_linear_projection": True, "attention_head_dim": [2, 4]}),
        ("sd2", "text_encoder/config.json", {"hidden_act": "gelu"}),
        ("sdxl", "unet/config.json", {"addition_embed_type": "text_time"}),
        ("sd3", "scheduler/scheduler_config.json", {"shift": 3.0}),
        ("sd3", "vae/config.json", {"latent_channels": 16, "use_quant_conv": False}),
        ("flux-dev", "transformer/config.json", {"guidance_embeds": True, "in_channels": 64}),
        ("flux-dev", "scheduler/scheduler_config.json", {"use_dynamic_shifting": True}),
        ("flux-schnell", "transformer/config.json", {"guidance_embeds": False}),
        ("flux-schnell", "scheduler/scheduler_config.json", {"use_dynamic_shifting": False}),
    ],
)
def test_family_model_has_its_family_traits(
    family: Family, config: str, expected: dict[str, Any], family_model_dir: FamilyModelDir
) -> None:
    values = json.loads((family_model_dir(family) / config).read_text())
    assert {key: values[key] for key in expected} == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_family_model_build_is_seeded(
    family: Family, family_model_dir: FamilyModelDir, tmp_path: Path
) -> None:
    rng_state = torch.get_rng_state()
    again = _digests(write_family_model(family, tmp_path / "again", seed=0))
    other = _digests(write_family_model(family, tmp_path / "other", seed=1))
    assert torch.equal(torch.get_rng_state(), rng_state)

    assert again == _digests(family_model_dir(family))
    weights = [name for name in again if name.endswith(".safetensors")]
    assert weights
    assert all(again[name] != other[name] for name in weights)


TINY_FAMILIES: dict[Family, ModelFamily] = {
    "sd1": ModelFamily.TINY,
    "sd2": ModelFamily.TINY_SD2,
    "sdxl": ModelFamily.TINY_SDXL,
    "sd3": ModelFamily.TINY_SD3,
    "flux-dev": ModelFamily.TINY_FLUX,
    "flux-schnell": ModelFamily.TINY_FLUX,
}
FLUX = "FluxTransformer2DModel 32 wide (double-stream blocks: 1, single-stream: 1)"
EVIDENCE: dict[Family, str] = {
    "sd1": "UNet with 32-wide cross-attention; text encoder 32 wide (StableDiffusionPipeline)",
    "sd2": "UNet with 48-wide cross-attention; text encoder 48 wide (StableDiffusionPipeline)",
    "sdxl": "UNet with 64-wide cross-attention and text_time conditioning; "
    "text encoders 32 + 32 wide (StableDiffusionXLPipeline)",
    "sd3": "SD3Transformer2DModel 32 wide (joint blocks: 2); "
    "text encoders 32 + 32 + 64 wide (StableDiffusion3Pipeline)",
    "flux-dev": f"{FLUX} with guidance embedding (as FLUX.1 dev); "
    "text encoders 32 + 64 wide (FluxPipeline)",
    "flux-schnell": f"{FLUX} without guidance embedding (as FLUX.1 schnell); "
    "text encoders 32 + 64 wide (FluxPipeline)",
}


def _widths(module: torch.nn.Module, suffix: str) -> set[int]:
    """Input widths of the linear layers whose names end with ``suffix``."""
    return {
        layer.in_features
        for name, layer in module.named_modules()
        if name.endswith(suffix) and isinstance(layer, torch.nn.Linear)
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_family_model_is_detected_as_its_tiny_family(
    family: Family, family_model_dir: FamilyModelDir
) -> None:
    pipeline = DiffusionPipeline.from_pretrained(
        str(family_model_dir(family)), local_files_only=True
    )
    detection = detect_pipeline(pipeline)
    assert detection.family is TINY_FAMILIES[family]
    assert detection.evidence == EVIDENCE[family]
    # The widths the LoRA rules expect of this family are this model's.
    unet = getattr(pipeline, "unet", None)
    if unet is not None:
        assert _widths(unet, "attn1.to_q") == ATTENTION_WIDTHS[detection.family]
        assert [CROSS_ATTENTION_FAMILIES[w] for w in _widths(unet, "attn2.to_k")] == [
            detection.family
        ]
    else:
        assert _widths(pipeline.transformer, "attn.to_q") == {TINY_TRANSFORMER_WIDTH}


def test_tiny_widths_are_the_family_models() -> None:
    assert TINY_SD2_CROSS_ATTENTION_DIM == SD2_TEXT_WIDTH
    assert TINY_SDXL_CROSS_ATTENTION_DIM == 2 * SDXL_TEXT_WIDTH
    assert TINY_T5_WIDTH == T5_WIDTH
