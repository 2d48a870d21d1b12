"""Cheap live previews of the latents while a generation is still sampling.

Decoding with the VAE at every step would cost about as much as the step itself, so the
preview projects the 4 latent channels straight to RGB with a fixed linear map. The map is
the widely used SD1.x approximation (ComfyUI's ``latent_formats.SD15``): blurry and a bit off
in colour, but it shows the composition forming, which is all a progress preview is for.
The preview stays at latent resolution (1/8 of the image); the client may scale it up.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

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
# The projection lands roughly in [-1, 1], like the VAE's output: x -> (x + 1) * 127.5.
_TO_PIXEL_SCALE = 127.5
_TO_PIXEL_BIAS = 127.5


def latents_to_preview_pngs(latents: torch.Tensor) -> list[str]:
    """One base64 PNG (no ``data:`` prefix) per batch item of ``latents`` (B, C, h, w).

    Any dtype and device is accepted: the projection runs on the CPU in float32, because
    half-precision matmuls are slow or missing there and a preview must not disturb the GPU.
    Latents that are not SD-shaped (C != 4, e.g. 16-channel SD3/Flux ones) get a grayscale
    of their channel mean instead: a rough preview beats failing a running generation.
    A single latent (C, h, w) is treated as a batch of one.
    """
    if latents.ndim == 3:
        latents = latents.unsqueeze(0)
    if latents.ndim != 4:
        raise ValueError(f"expected latents shaped (B, C, h, w), got {tuple(latents.shape)}")
    values = torch.nan_to_num(latents.detach().to(device="cpu", dtype=torch.float32))
    if values.shape[1] == _SD15_LATENT_RGB_FACTORS.shape[0]:
        # (B, C, h, w) x (C, 3) -> (B, h, w, 3): already the row-major layout images use.
        projected = torch.einsum("bchw,cr->bhwr", values, _SD15_LATENT_RGB_FACTORS)
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
