"""FLUX.1's packed latents back to a grid for previews: as diffusers' FluxPipeline unpacks
them, whichever path (NumPy for CPU float tensors, torch otherwise) does it."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from app.cores.model_manager.pipeline_manager import unpacked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unpacked_matches_diffusers(dtype: torch.dtype) -> None:
    height, width, scale = 96, 64, 8  # 6 x 4 patches of 2 x 2
    tokens = (height // (scale * 2)) * (width // (scale * 2))
    packed = torch.randn(2, tokens, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    expected = FluxPipeline._unpack_latents(packed, height, width, scale)
    grid = unpacked(packed, width, height, scale)
    assert grid.shape == (2, 16, height // scale, width // scale)
    assert grid.dtype == dtype
    assert torch.equal(grid, expected)


def test_other_latents_are_returned_as_they_are() -> None:
    latents = torch.zeros(1, 4, 8, 8)
    assert unpacked(latents, 64, 64, 8) is latents
