"""Latent previews decode to real PNGs at latent resolution, whatever the tensor looks like,
with the latent map's pixels, and without torch kernels (which may wake its thread pool)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from app.cores.model_manager.model_family import ModelFamily
from app.features.generators.previews import (
    FLUX_PREVIEW,
    SD3_PREVIEW,
    SD_PREVIEW,
    LatentPreview,
    _png_base64,
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


@pytest.mark.parametrize(
    ("channels", "preview"), [(4, SD_PREVIEW), (16, SD3_PREVIEW), (16, FLUX_PREVIEW)]
)
def test_pixels_are_the_latent_map_rounded(channels: int, preview: LatentPreview) -> None:
    latents = _latents(2, channels, 6, 10) * 2
    # The map in float64, straight from its definition: rgb = latents x factors + bias, from
    # [-1, 1] to [0, 255]; float32 may land a pixel one level off where float64 rounds .5.
    rgb = (
        np.einsum("bchw,cr->bhwr", latents.double().numpy(), preview.factors.double().numpy())
        + preview.bias.double().numpy()
    )
    expected = np.clip(rgb * 127.5 + 127.5, 0, 255).round()
    for encoded, want in zip(latents_to_preview_pngs(latents, preview), expected, strict=True):
        got = np.asarray(_decode(encoded), dtype=float)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1
        assert (got == want).mean() > 0.99


class _RecordedOps(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The torch kernels (aten operators) that run inside the block."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: list[str] = []

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_cpu_float32_latents_run_no_torch_kernel() -> None:
    # The preview runs in the denoising loop's step callback: a torch kernel on the CPU may
    # wake torch's intra-op thread pool, which on a busy machine costs a scheduler time slice
    # per kernel. The arithmetic is NumPy's; torch only hands over its buffer.
    sixteen, four = _latents(4, 16, 32, 32), _latents(4, 4, 32, 32)
    with _RecordedOps() as recorded:
        latents_to_preview_pngs(sixteen, SD3_PREVIEW)
        latents_to_preview_pngs(four, SD_PREVIEW)
        latents_to_preview_pngs(sixteen, SD_PREVIEW)  # the grayscale fallback
    assert recorded.ops
    assert set(recorded.ops) == {"aten.detach.default"}


@pytest.mark.parametrize("shape", [(1, 1, 3), (12, 20, 3), (7, 33, 3), (1, 1), (12, 20)])
def test_preview_pngs_are_valid_and_lossless(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = base64.b64decode(_png_base64(pixels), validate=True)
    checked = Image.open(io.BytesIO(data))
    checked.verify()  # chunk layout and every CRC
    image = _decode(_png_base64(pixels))
    assert image.mode == ("RGB" if len(shape) == 3 else "L")
    assert np.array_equal(np.asarray(image), pixels)
