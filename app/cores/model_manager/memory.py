"""A generation's working memory, estimated before it runs, against what the user allows.

The user gives the backend a share of the device's memory (``gpu_scale_factor`` for a GPU,
``ram_scale_factor`` for the CPU). The loaded weights take their part of it; what is left is
the generation's budget. A request whose estimate exceeds it is refused before anything
runs, instead of taking the machine's memory (and every other request's turn) for minutes
and then failing, or getting the server killed.

The estimate is deliberately on the safe side and simple: activations scale with the
pixels of each pass. The VAE decodes one image at a time (slicing, enabled at load), so its
peak does not grow with the batch; when even one image cannot be decoded within the budget,
it decodes in tiles, whose peak depends on the tile size only. ``make bench`` compares the
estimate with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil
import torch

GiB = 1024**3

DENOISER_FACTOR = 40
"""Values kept alive per latent value and channel by a UNet level (skip connections,
resnet and attention intermediates), with room to spare."""
VAE_DECODE_FACTOR = 10
"""Values alive per pixel and full-resolution channel while the VAE decodes one image."""
IMAGE_BYTES_PER_PIXEL = 48
"""Each finished image while it is turned into a picture (float and 8-bit copies)."""
CALL_OVERHEAD_BYTES = 256 * 1024**2
"""Memory every generation takes whatever its size: allocator pools, kernel workspaces and
library buffers. ``make bench`` measured 100-230 MiB of it on a CPU, where the per-pixel
terms alone fell short for a single 512x512 image."""
MPS_SHARE_OF_RAM = 0.8
"""Apple's GPU shares system memory; the part it may use (as the UI's settings show)."""


@dataclass(frozen=True)
class MemoryShares:
    """The shares of device memory the user allows (the UI's memory settings)."""

    gpu: float
    ram: float


@dataclass(frozen=True)
class ImagePass:
    """One run of the pipeline: ``batch`` images of ``width`` x ``height`` pixels."""

    width: int
    height: int
    batch: int


@dataclass(frozen=True)
class Budget:
    """What a generation may use on the device, and how that figure came about."""

    total: int
    share: float
    share_name: str
    held: int
    device: str

    @property
    def limit(self) -> int:
        return max(0, int(self.total * self.share) - self.held)

    def explain(self) -> str:
        return (
            f"{self.share:.0%} of the {self.total / GiB:.1f} GiB of {self.device} "
            f"({self.share_name}), less {self.held / GiB:.1f} GiB held by the loaded model"
        )


@dataclass(frozen=True)
class MemoryPlan:
    estimate: int
    tiled_decode: bool
    budget: Budget

    @property
    def fits(self) -> bool:
        return self.estimate <= self.budget.limit


def weights_bytes(pipeline: Any) -> int:
    """Bytes of every weight of the pipeline's models."""
    modules = [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def budget_for(device: torch.device, shares: MemoryShares, held: int) -> Budget:
    if device.type == "cuda":
        total = int(torch.cuda.get_device_properties(device).total_memory)
        # On a GPU, what is allocated there is what is held (weights, prepared LoRAs).
        held = max(held, int(torch.cuda.memory_allocated(device)))
        return Budget(total, shares.gpu, "gpu_scale_factor", held, f"GPU {device}")
    ram = int(psutil.virtual_memory().total)
    if device.type == "mps":
        total = int(ram * MPS_SHARE_OF_RAM)
        return Budget(total, shares.gpu, "gpu_scale_factor", held, "the Apple GPU")
    return Budget(ram, shares.ram, "ram_scale_factor", held, "system RAM")


def _value_bytes(module: Any) -> int:
    return int(torch.finfo(module.dtype).bits // 8) if module is not None else 4


def _denoiser_bytes(pipeline: Any, image: ImagePass, vae_scale: int) -> int:
    # Classifier-free guidance runs every image twice (with and without the prompt).
    rows, columns = image.height // vae_scale, image.width // vae_scale
    unet = getattr(pipeline, "unet", None)
    if unet is not None:
        channels = [int(c) for c in unet.config.block_out_channels]
        values = sum(c * (rows >> level) * (columns >> level) for level, c in enumerate(channels))
        return 2 * image.batch * values * DENOISER_FACTOR * _value_bytes(unet)
    transformer = pipeline.transformer  # SD3, FLUX: tokens of 2x2 latent patches
    config = transformer.config
    width = int(config.num_attention_heads) * int(config.attention_head_dim)
    tokens = (rows // 2) * (columns // 2)
    return 2 * image.batch * tokens * width * DENOISER_FACTOR * _value_bytes(transformer)


def _vae_scale(vae: Any) -> int:
    return int(2 ** (len(vae.config.block_out_channels) - 1))


def _decode_bytes(vae: Any, image: ImagePass, tiled: bool) -> int:
    full_resolution_channels = int(vae.config.block_out_channels[0])
    per_pixel = VAE_DECODE_FACTOR * full_resolution_channels * _value_bytes(vae)
    pixels = image.width * image.height
    if tiled:  # one tile at a time; the tiles' pixels are kept to blend them
        tile = int(getattr(vae, "tile_sample_min_size", vae.config.sample_size))
        return per_pixel * min(pixels, tile * tile) + IMAGE_BYTES_PER_PIXEL * pixels
    return per_pixel * pixels


def estimate(pipeline: Any, passes: list[ImagePass], *, tiled: bool) -> int:
    """Peak working memory of the generation: the largest of its passes."""
    vae = pipeline.vae
    scale = _vae_scale(vae)
    return CALL_OVERHEAD_BYTES + max(
        max(_denoiser_bytes(pipeline, image, scale), _decode_bytes(vae, image, tiled))
        + IMAGE_BYTES_PER_PIXEL * image.width * image.height * image.batch
        for image in passes
    )


def plan_memory(pipeline: Any, passes: list[ImagePass], budget: Budget) -> MemoryPlan:
    """Whole decoding when it fits ``budget``, else tiled (which may not fit either)."""
    whole = MemoryPlan(estimate(pipeline, passes, tiled=False), False, budget)
    return whole if whole.fits else MemoryPlan(estimate(pipeline, passes, tiled=True), True, budget)
