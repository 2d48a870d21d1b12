"""The embedded default model: a tiny Stable-Diffusion-shaped pipeline built offline.

Nothing can be downloaded at run time, so the backend builds its own default model from
configs with seeded weights and saves it as an ordinary diffusers folder. It runs the real
``StableDiffusionPipeline`` code; it is only small (a 64x64 image takes well under a second
on a CPU). Building is deterministic: the same code writes the same bytes every time.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_FOLDER = "embedded--tiny-sd"
# Bump when the architecture or seeds change, so that old folders are rebuilt.
EMBEDDED_MODEL_VERSION = "1"
_VERSION_FILE = "embedded_model_version.txt"

_CROSS_ATTENTION_DIM = 32


def _byte_to_unicode() -> dict[int, str]:
    """CLIP's byte-level alphabet: each byte maps to one printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def write_tokenizer(folder: Path) -> None:
    """A byte-level CLIP tokenizer with no merges: every string encodes, offline."""
    folder.mkdir(parents=True)
    characters = list(_byte_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    # Without model_max_length the pipeline would pad prompts to a huge length.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tokenizer.save_pretrained(str(folder))


def _build_pipeline(tokenizer_dir: Path) -> Any:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(1)
    # Four blocks give the usual scale factor of 8 between pixels and latents.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=_CROSS_ATTENTION_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            projection_dim=_CROSS_ATTENTION_DIM,
        )
    )
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def is_built(model_dir: Path) -> bool:
    version_file = model_dir / _VERSION_FILE
    return version_file.is_file() and version_file.read_text().strip() == EMBEDDED_MODEL_VERSION


def build_embedded_model(model_dir: Path) -> Path:
    """Write the embedded model to ``model_dir`` unless a current build is already there.

    The folder appears atomically: it is built beside its final place and renamed, so a
    crash leaves either no folder or a complete one.
    """
    if is_built(model_dir):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Building the embedded default model in %s", model_dir)
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".build-") as scratch:
        scratch_dir = Path(scratch)
        tokenizer_dir = scratch_dir / "tokenizer-source"
        write_tokenizer(tokenizer_dir)
        build_dir = scratch_dir / "model"
        pipeline = _build_pipeline(tokenizer_dir)
        pipeline.save_pretrained(str(build_dir), safe_serialization=True)
        (build_dir / _VERSION_FILE).write_text(EMBEDDED_MODEL_VERSION + "\n")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        build_dir.rename(model_dir)
    return model_dir
