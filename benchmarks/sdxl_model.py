"""The SDXL-sized benchmark model: SDXL base 1.0's real architecture with seeded weights.

:func:`sdxl_pipeline` builds a ``StableDiffusionXLPipeline`` from the public configs of
``stabilityai/stable-diffusion-xl-base-1.0`` (nothing is downloaded; the tokenizers are the
embedded model's byte-level one):

* UNet: 320/640/1280 channels, no attention in the 320-wide blocks, 1/2/10 transformer layers
  per block (``transformer_layers_per_block``), heads of 64 (``attention_head_dim`` 5/10/20),
  linear projections, cross-attention 2048 wide (CLIP-L's 768 + OpenCLIP bigG's 1280 side by
  side), ``text_time`` added conditioning (bigG's pooled 1280 + 6 size/crop ids embedded at
  256 = 2816), 2.57 G parameters.
* ``text_encoder``: CLIP ViT-L/14's text tower (768 wide, 12 layers, 12 heads, quick-gelu).
* ``text_encoder_2``: OpenCLIP ViT-bigG/14's text tower with its projection (1280 wide,
  32 layers, 20 heads, MLP 5120, gelu, projection 1280), 695 M parameters.
* VAE: SDXL's (the SD one with ``scaling_factor`` 0.13025, ``force_upcast``).
* Scheduler: SDXL's Euler (scaled-linear betas 0.00085-0.012, "leading" spacing, offset 1).

The modules are created directly in bfloat16 (``torch.set_default_dtype`` around their
construction, restored afterwards): an fp32 build would need twice the memory (~10 GiB for the
UNet alone) before the conversion. :mod:`benchmarks.models` saves it in fp16 (about 7 GB) into
the versioned cache folder, like the SD 1.5-sized model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

SDXL_FOLDER = "bench--sdxl-shaped"
# Bump when the architecture or seeds change, so that old folders are rebuilt.
SDXL_VERSION = "2"
SDXL_BUILD_DTYPE = torch.bfloat16
SDXL_SAVE_DTYPE = torch.float16
"""fp16 on disk, like the published checkpoints: loading it as bf16 (CPU) or fp16 (CUDA) gives
weights in ordinary memory. A file already in the load dtype would stay mapped from the file
(diffusers keeps safetensors' private mapping then): lazily paged in, copied on first write."""
SDXL_MAX_SHARD = "2GB"
"""Shard size on disk: bounds the serialisation buffer while saving the 5 GB UNet."""


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating-point parameters in ``dtype`` inside the block."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def sdxl_unet() -> UNet2DConditionModel:
    """SDXL base 1.0's ``unet/config.json``."""
    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
    )


def sdxl_vae() -> AutoencoderKL:
    """SDXL base 1.0's ``vae/config.json``."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def _clip_config(**config: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        # The byte-level tokenizer's ids (< 514) are valid for this vocabulary.
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        **config,
    )


def clip_l_text_encoder() -> CLIPTextModel:
    """CLIP ViT-L/14's text tower (SD 1.5's text encoder, SDXL's first), seeded."""
    torch.manual_seed(2)
    return CLIPTextModel(
        _clip_config(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    )


def sdxl_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """CLIP ViT-L/14's text tower and OpenCLIP ViT-bigG/14's, with its projection."""
    clip_l = clip_l_text_encoder()
    torch.manual_seed(3)
    big_g = CLIPTextModelWithProjection(
        _clip_config(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
            hidden_act="gelu",
        )
    )
    return clip_l, big_g


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base 1.0's ``scheduler/scheduler_config.json``."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        interpolation_type="linear",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )


def sdxl_pipeline(tokenizer_dir: Path) -> Any:
    """The SDXL-sized pipeline, weights seeded and created in bfloat16."""
    with default_dtype(SDXL_BUILD_DTYPE):
        torch.manual_seed(0)
        unet = sdxl_unet()
        torch.manual_seed(1)
        vae = sdxl_vae()
        text_encoder, text_encoder_2 = sdxl_text_encoders()
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
