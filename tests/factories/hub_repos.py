"""Diffusers repositories as the Hugging Face Hub holds them, built offline for the fake Hub.

Each builder writes an ordinary ``save_pretrained`` folder with both the full-precision
weights and an ``fp16`` variant beside them (``diffusion_pytorch_model.safetensors`` and
``diffusion_pytorch_model.fp16.safetensors``), as real repositories do, so downloaders have
to choose. Weights are seeded: the same seed writes the same bytes, and images differ from
the embedded model's at the same generation seed. Global torch RNG state is left untouched.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from app.cores.model_manager.embedded_model import _write_tokenizer, build_embedded_model

_TEXT_WIDTH = 32  # each SDXL text encoder; the UNet attends to both, concatenated
_TIME_EMBED_DIM = 8  # SDXL adds 6 time ids (sizes, crop, target) embedded at this width


def write_sd15_repo(folder: Path, seed: int, *, embedded: Path | None = None) -> Path:
    """The embedded tiny SD 1.5-shaped model with its weights nudged by seeded noise.

    Noise (rather than a fresh initialisation) keeps the model producing sane images while
    making them differ from the embedded model's. ``embedded`` is a built embedded-model
    folder to start from (the session's ``embedded_model_dir``); built here when omitted.
    """
    with tempfile.TemporaryDirectory() as scratch:
        source = embedded or build_embedded_model(Path(scratch) / "embedded")
        pipeline = StableDiffusionPipeline.from_pretrained(str(source), local_files_only=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
            for parameter in module.parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * 0.05)
    return _save_with_fp16_variant(pipeline, folder)


def write_sdxl_repo(folder: Path, seed: int) -> Path:
    """A tiny SDXL-shaped pipeline (two text encoders, text_time conditioning) from configs.

    It runs the real ``StableDiffusionXLPipeline`` code: a 64x64 image in a couple of steps
    takes well under a second on a CPU.
    """
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = Path(scratch) / "tokenizer"
        _write_tokenizer(tokenizer_dir)  # the embedded model's offline byte-level tokenizer
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = StableDiffusionXLPipeline(
            vae=_tiny_vae(),
            text_encoder=CLIPTextModel(_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(_text_config()),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=_tiny_sdxl_unet(),
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                num_train_timesteps=1000,
                steps_offset=1,
                timestep_spacing="leading",
            ),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    return _save_with_fp16_variant(pipeline, folder)


def _save_with_fp16_variant(pipeline: Any, folder: Path) -> Path:
    """fp16 variant first, then full precision: the configs left behind are float32 ones,
    as in real repositories (transformers writes the dtype into ``config.json``)."""
    pipeline.to(torch.float16).save_pretrained(str(folder), safe_serialization=True, variant="fp16")
    pipeline.to(torch.float32).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=514,  # the byte-level tokenizer's size, ids 512/513 = start/end
        hidden_size=_TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        projection_dim=_TEXT_WIDTH,
    )


def _tiny_vae() -> AutoencoderKL:
    # Four blocks give the usual scale factor of 8 between pixels and latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's
    )


def _tiny_sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=2 * _TEXT_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED_DIM,
        # pooled text_embeds of text_encoder_2 + 6 time ids, each embedded
        projection_class_embeddings_input_dim=_TEXT_WIDTH + 6 * _TIME_EMBED_DIM,
        norm_num_groups=8,
    )
