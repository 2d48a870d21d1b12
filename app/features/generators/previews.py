"""Cheap live previews of the latents while a generation is still sampling.

Decoding with the VAE at every step would cost about as much as the step itself, so the
preview projects the latent channels straight to RGB with a fixed linear map per latent
format: the widely used approximations (published with ComfyUI's ``latent_formats``): SD 1.x's
4x3 map for the 4-channel VAEs (SD 1.x, 2.x, SDXL), and 16x3 maps with a bias for SD3's and
FLUX.1's 16-channel VAEs. Blurry and a bit off in colour, but they show the composition
forming, which is all a progress preview is for. FLUX.1's packed latents are unpacked before
(``PipelineManager``). The preview stays at latent resolution (1/8 of the image); the client
may scale it up.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from app.cores.model_manager.model_family import ModelFamily

# Rows: latent channels 0-3; columns: R, G, B. Applies to *scaled* latents, the ones the
# sampler works on (what the VAE decode divides by its scaling factor).
_SD15_LATENT_RGB_FACTORS = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ],
    dtype=torch.float32,
)
_SD3_LATENT_RGB_FACTORS = torch.tensor(
    [
        [-0.0645, 0.0177, 0.1052],
        [0.0028, 0.0312, 0.0650],
        [0.1848, 0.0762, 0.0360],
        [0.0944, 0.0360, 0.0889],
        [0.0897, 0.0506, -0.0364],
        [-0.0020, 0.1203, 0.0284],
        [0.0855, 0.0118, 0.0283],
        [-0.0539, 0.0658, 0.1047],
        [-0.0057, 0.0116, 0.0700],
        [-0.0412, 0.0281, -0.0039],
        [0.1106, 0.1171, 0.1220],
        [-0.0248, 0.0682, -0.0481],
        [0.0815, 0.0846, 0.1207],
        [-0.0120, -0.0055, -0.0867],
        [-0.0749, -0.0634, -0.0456],
        [-0.1418, -0.1457, -0.1259],
    ],
    dtype=torch.float32,
)
_FLUX_LATENT_RGB_FACTORS = torch.tensor(
    [
        [-0.0346, 0.0244, 0.0681],
        [0.0034, 0.0210, 0.0687],
        [0.0275, -0.0668, -0.0433],
        [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329],
        [0.0004, 0.0383, 0.0115],
        [0.0405, 0.0861, 0.0915],
        [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180],
        [0.1008, 0.0755, -0.0421],
        [-0.0515, 0.0201, 0.0011],
        [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749],
        [-0.1264, -0.0522, -0.1103],
        [-0.0280, -0.0881, -0.0499],
        [-0.1262, -0.0982, -0.0778],
    ],
    dtype=torch.float32,
)
_FLUX_LATENT_RGB_BIAS = torch.tensor([-0.0329, -0.0718, -0.0851], dtype=torch.float32)
_NO_BIAS = torch.zeros(3, dtype=torch.float32)


@dataclass(frozen=True)
class LatentPreview:
    """One latent format's linear map to RGB: ``rgb = latents x factors + bias``."""

    factors: torch.Tensor
    bias: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.factors.shape[0])


SD_PREVIEW = LatentPreview(_SD15_LATENT_RGB_FACTORS, _NO_BIAS)
SD3_PREVIEW = LatentPreview(_SD3_LATENT_RGB_FACTORS, _NO_BIAS)
FLUX_PREVIEW = LatentPreview(_FLUX_LATENT_RGB_FACTORS, _FLUX_LATENT_RGB_BIAS)


def preview_for(architecture: ModelFamily) -> LatentPreview:
    """The map for a model family's latents (SD 1.x's for the 4-channel families)."""
    if architecture is ModelFamily.SD3:
        return SD3_PREVIEW
    if architecture is ModelFamily.FLUX:
        return FLUX_PREVIEW
    return SD_PREVIEW


# The projection lands roughly in [-1, 1], like the VAE's output: x -> (x + 1) * 127.5.
_TO_PIXEL_SCALE = 127.5
_TO_PIXEL_BIAS = 127.5


def latents_to_preview_pngs(
    latents: torch.Tensor, preview: LatentPreview = SD_PREVIEW
) -> list[str]:
    """One base64 PNG (no ``data:`` prefix) per batch item of ``latents`` (B, C, h, w).

    Any dtype and device is accepted: the projection runs on the CPU in float32, because
    half-precision matmuls are slow or missing there and a preview must not disturb the GPU.
    Latents whose channel count the map does not have get a grayscale of their channel
    mean instead: a rough preview beats failing a running generation.
    A single latent (C, h, w) is treated as a batch of one.
    """
    if latents.ndim == 3:
        latents = latents.unsqueeze(0)
    if latents.ndim != 4:
        raise ValueError(f"expected latents shaped (B, C, h, w), got {tuple(latents.shape)}")
    values = torch.nan_to_num(latents.detach().to(device="cpu", dtype=torch.float32))
    if values.shape[1] == preview.channels:
        # (B, C, h, w) x (C, 3) -> (B, h, w, 3): already the row-major layout images use.
        projected = torch.einsum("bchw,cr->bhwr", values, preview.factors) + preview.bias
    else:
        projected = values.mean(dim=1)
    pixels = (projected * _TO_PIXEL_SCALE + _TO_PIXEL_BIAS).clamp(0, 255).round()
    arrays = pixels.to(torch.uint8).numpy()
    return [_png_base64(array) for array in arrays]


def _png_base64(array: npt.NDArray[np.uint8]) -> str:
    """PNG of an (h, w, 3) RGB or (h, w) grayscale array, as base64 text."""
    buffer = io.BytesIO()
    # Fastest compression: previews are tiny, short-lived and sent every few steps.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
