"""Latent previews decode to real PNGs at latent resolution, whatever the tensor looks like."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.cores.model_manager.model_family import ModelFamily
from app.features.generators.previews import (
    FLUX_PREVIEW,
    SD3_PREVIEW,
    SD_PREVIEW,
    latents_to_preview_pngs,
    preview_for,
)


def _decode(encoded: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
    assert image.format == "PNG"
    return image


def _latents(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_one_rgb_png_per_item_at_latent_size() -> None:
    previews = latents_to_preview_pngs(_latents(3, 4, 12, 20))
    assert len(previews) == 3
    for encoded in previews:
        assert not encoded.startswith("data:")
        image = _decode(encoded)
        assert image.size == (20, 12)
        assert image.mode == "RGB"


def test_preview_reflects_the_latents() -> None:
    # Channel 3 weighs most on blue, negatively: pushing it down must make the image bluer.
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 3] = -1.0
    # (0.2120, 0.2616, 0.7177) mapped from [-1, 1] to [0, 255].
    assert _decode(latents_to_preview_pngs(latents)[0]).getpixel((0, 0)) == (155, 161, 219)
    uniform = _decode(latents_to_preview_pngs(torch.zeros(1, 4, 8, 8))[0])
    assert uniform.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_latents(dtype: torch.dtype) -> None:
    full = np.asarray(_decode(latents_to_preview_pngs(_latents(1, 4, 8, 8))[0]), dtype=int)
    half = np.asarray(
        _decode(latents_to_preview_pngs(_latents(1, 4, 8, 8, dtype=dtype))[0]), dtype=int
    )
    assert half.shape == (8, 8, 3)
    # Only the input's rounding differs: a few pixel levels at most.
    assert np.abs(half - full).max() <= 4


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        (ModelFamily.SD1, SD_PREVIEW),
        (ModelFamily.SDXL, SD_PREVIEW),
        (ModelFamily.SD3, SD3_PREVIEW),
        (ModelFamily.FLUX, FLUX_PREVIEW),
        (ModelFamily.TINY_FLUX.architecture, FLUX_PREVIEW),
    ],
)
def test_each_family_has_its_latent_formats_map(family: ModelFamily, expected: object) -> None:
    assert preview_for(family) is expected


def test_sixteen_channel_latents_are_shown_in_colour_with_the_bias() -> None:
    [encoded] = latents_to_preview_pngs(torch.zeros(1, 16, 6, 10), FLUX_PREVIEW)
    image = _decode(encoded)
    assert image.mode == "RGB"
    # All-zero latents show FLUX.1's bias (-0.0329, -0.0718, -0.0851) mapped to pixels.
    assert image.getpixel((0, 0)) == (123, 118, 117)
    [sd3] = latents_to_preview_pngs(_latents(1, 16, 6, 10), SD3_PREVIEW)
    assert _decode(sd3).size == (10, 6)


def test_other_channel_counts_fall_back_to_grayscale() -> None:
    previews = latents_to_preview_pngs(_latents(2, 16, 6, 10))
    assert len(previews) == 2
    image = _decode(previews[0])
    assert image.size == (10, 6)
    assert image.mode == "L"


def test_non_finite_values_do_not_break_the_preview() -> None:
    latents = _latents(1, 4, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    latents[0, 1, 1, 1] = float("inf")
    assert _decode(latents_to_preview_pngs(latents)[0]).size == (8, 8)


def test_latents_that_need_grad_are_accepted() -> None:
    latents = _latents(1, 4, 8, 8).requires_grad_()
    assert _decode(latents_to_preview_pngs(latents)[0]).mode == "RGB"
