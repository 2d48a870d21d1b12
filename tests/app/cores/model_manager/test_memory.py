"""A generation's working memory is estimated before it runs: the estimate grows with the
pixels of each pass, the VAE decodes one image at a time (so a batch adds only its finished
images), and tiles are used only when one whole image does not fit the user's share."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from app.cores.model_manager.memory import (
    CALL_OVERHEAD_BYTES,
    Budget,
    GiB,
    ImagePass,
    MemoryShares,
    budget_for,
    estimate,
    plan_memory,
)
from app.cores.model_manager.pipeline_manager import PipelineManager


def budget(limit: int) -> Budget:
    return Budget(total=limit, share=1.0, share_name="ram_scale_factor", held=0, device="RAM")


# ``tiny_pipeline`` is typed ``Any``: diffusers leaves most of a pipeline's attributes
# (its components, ``__call__``) unannotated.
def test_the_estimate_grows_with_pixels_and_batch(tiny_pipeline: Any) -> None:
    def needed(side: int, batch: int = 1) -> int:
        """What scales with the request: the estimate less the fixed cost of any call."""
        whole = estimate(tiny_pipeline, [ImagePass(side, side, batch)], tiled=False)
        return whole - CALL_OVERHEAD_BYTES

    assert needed(64) < needed(512) < needed(2048)
    assert needed(512) * 15 < needed(2048) < needed(512) * 17  # pixels: 16 times as many
    # One image decoded at a time: 16 images need far less than 16 times one image.
    assert needed(1024) < needed(1024, batch=16) < 16 * needed(1024)


def test_the_largest_pass_sets_the_estimate(tiny_pipeline: Any) -> None:
    base, hires = ImagePass(512, 512, 2), ImagePass(1024, 1024, 2)
    both = estimate(tiny_pipeline, [base, hires], tiled=False)
    assert both == estimate(tiny_pipeline, [hires], tiled=False)


def test_tiles_only_when_a_whole_image_does_not_fit(
    tiny_pipeline: Any,
) -> None:
    passes = [ImagePass(2048, 2048, 1)]
    whole = estimate(tiny_pipeline, passes, tiled=False)
    tiled = estimate(tiny_pipeline, passes, tiled=True)
    assert tiled < whole

    roomy = plan_memory(tiny_pipeline, passes, budget(whole))
    assert (roomy.fits, roomy.tiled_decode, roomy.estimate) == (True, False, whole)
    tight = plan_memory(tiny_pipeline, passes, budget(whole - 1))
    assert (tight.fits, tight.tiled_decode, tight.estimate) == (True, True, tiled)
    too_small = plan_memory(tiny_pipeline, passes, budget(tiled - 1))
    assert (too_small.fits, too_small.tiled_decode) == (False, True)


def test_the_budget_is_the_users_share_less_the_loaded_weights() -> None:
    shares = MemoryShares(gpu=0.9, ram=0.25)
    cpu = budget_for(torch.device("cpu"), shares, held=1 * GiB)
    assert (cpu.share, cpu.share_name, cpu.held) == (0.25, "ram_scale_factor", GiB)
    assert cpu.limit == int(cpu.total * 0.25) - GiB
    assert "25% of the" in cpu.explain()
    assert "ram_scale_factor" in cpu.explain()
    assert budget_for(torch.device("cpu"), shares, held=cpu.total).limit == 0


def test_tiled_decoding_is_a_real_path_and_is_switched_off_afterwards(
    tiny_pipeline: Any,
) -> None:
    manager = PipelineManager(tiny_pipeline, "tiny", torch.device("cpu"))
    vae = tiny_pipeline.vae
    assert vae.use_slicing  # enabled at load: one image at a time

    def render() -> np.ndarray:
        # The tiny VAE's tiles are 64 px: a 128 px image is decoded as overlapping tiles.
        result = tiny_pipeline(
            "a lighthouse",
            num_inference_steps=2,
            width=128,
            height=128,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        )
        images: np.ndarray = result.images
        return images

    whole = render()
    with manager.decoding_in_tiles(True):
        assert vae.use_tiling
        tiled = render()
    assert not vae.use_tiling
    assert tiled.shape == whole.shape
    assert not np.array_equal(tiled, whole)  # blended at the seams...
    assert np.abs(tiled - whole).mean() < 0.1  # ...but the same picture


def test_whole_decoding_leaves_the_vae_alone(tiny_pipeline: Any) -> None:
    manager = PipelineManager(tiny_pipeline, "tiny", torch.device("cpu"))
    with manager.decoding_in_tiles(False):
        assert not tiny_pipeline.vae.use_tiling
