"""Diffusers repositories as the Hugging Face Hub holds them, built offline for the fake Hub.

Each builder writes an ordinary ``save_pretrained`` folder with both the full-precision
weights and an ``fp16`` variant beside them (``diffusion_pytorch_model.safetensors`` and
``diffusion_pytorch_model.fp16.safetensors``), as real repositories do, so downloaders have
to choose. Weights are seeded: the same seed writes the same bytes, and images differ from
the embedded model's at the same generation seed. Global torch RNG state is left untouched.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from app.cores.model_manager.embedded_model import build_embedded_model
from tests.factories.family_models import write_family_model


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


def write_sdxl_repo(folder: Path, seed: int, *, built: Path | None = None) -> Path:
    """The tiny SDXL family model (``tests.factories.family_models``) as a Hub repository:
    its folder as written, plus an fp16 twin of each weights file.

    ``built`` is that model already written with this ``seed`` (the session's
    ``family_model_dir("sdxl", seed)``) to copy; built here when omitted.
    """
    with tempfile.TemporaryDirectory() as scratch:
        source = built or write_family_model("sdxl", Path(scratch) / "sdxl", seed)
        shutil.copytree(source, folder)
    _add_fp16_variant(folder)
    return folder


def _save_with_fp16_variant(pipeline: Any, folder: Path) -> Path:
    """fp16 variant first, then full precision: the configs left behind are float32 ones,
    as in real repositories (transformers writes the dtype into ``config.json``)."""
    pipeline.to(torch.float16).save_pretrained(str(folder), safe_serialization=True, variant="fp16")
    pipeline.to(torch.float32).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _add_fp16_variant(folder: Path) -> None:
    """Beside each full-precision weights file, its ``fp16`` variant (``model.fp16.safetensors``
    beside ``model.safetensors``), as ``save_pretrained(variant="fp16")`` names it; the tiny
    models are one file per component, with no shard index to rewrite."""
    for weights in sorted(folder.rglob("*.safetensors")):
        if weights.suffixes[-2:] == [".fp16", ".safetensors"]:
            continue
        with safe_open(str(weights), framework="pt") as source:
            metadata = source.metadata()
            tensors = {name: source.get_tensor(name) for name in source.keys()}  # noqa: SIM118
        half = {
            name: tensor.half() if tensor.is_floating_point() else tensor
            for name, tensor in tensors.items()
        }
        save_file(half, str(weights.with_suffix(".fp16.safetensors")), metadata=metadata)
