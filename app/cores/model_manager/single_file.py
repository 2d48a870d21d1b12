"""Load a single-file checkpoint (original A1111/ComfyUI layout) into a diffusers pipeline.

The weights come from the file, converted by diffusers' own single-file loading
(``<Pipeline>.from_single_file``, diffusers 0.42: ``loaders/single_file.py``). Everything
else a pipeline needs and a checkpoint does not hold (each component's ``config.json``, the
scheduler config, the tokenizers) comes from ``config=``, a local diffusers folder of the same
family: a model already on the machine, or configs fetched once from the Hub (what diffusers
itself fetches for a single file: ``*.json``, ``*.txt``, ``*.model``).

Two things are done around diffusers' call, each for a reason found in its code:

* It is given a copy of only those config files, never the folder itself, so that every
  weight comes from the file. For a component it does not find in the file, diffusers falls
  back to ``from_pretrained`` on the config folder when that holds diffusers-named weights
  (``load_single_file_sub_model``, ``_is_model_weights_in_cached_folder``). In 0.42 none of
  the five families' components takes that path (their VAE, UNet and transformer classes
  convert from the file or fail; transformers' weight files have other names), so this is a
  guarantee against a change of version rather than a fix: a missing part is an error.
* ``create_diffusers_clip_model_from_ldm`` picks the tensors for each CLIP text encoder by the
  width of the encoder it builds; where a file's two CLIP encoders are equally wide (the tiny
  SDXL and SD3 test models), it loads the first one's into both. There, the second encoder is
  built by the same diffusers function from its own prefix's tensors only and passed in.

diffusers 0.42 also replaces SD3's CLIP-L text projection with the identity (SAI's reference
code uses CLIP-L's pooled output unprojected), and converts FLUX.1 transformers only at their
real width (``convert_flux_transformer_checkpoint_to_diffusers`` splits at 3072), so the tiny
FLUX.1 test model cannot be loaded from a single file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import (
    SingleFileComponentError,
    create_diffusers_clip_model_from_ldm,
)
from safetensors import safe_open
from transformers import CLIPTextModelWithProjection

from app.cores.model_manager.checkpoint_files import CheckpointInfo, inspect_checkpoint
from app.cores.model_manager.model_family import (
    ModelFamily,
    family_from_transformer,
    family_from_unet_config,
    transformer_width,
)

F = ModelFamily
PIPELINE_CLASSES: Mapping[ModelFamily, Any] = {
    F.SD1: StableDiffusionPipeline,
    F.SD2: StableDiffusionPipeline,
    F.SDXL: StableDiffusionXLPipeline,
    F.SD3: StableDiffusion3Pipeline,
    F.FLUX: FluxPipeline,
}
"""The text-to-image pipeline class of each architecture."""
CONFIG_SUFFIXES = (".json", ".txt", ".model")
"""The files diffusers fetches as a single file's configs (``allow_patterns`` in
``_download_diffusers_model_config_from_hub``): configs, tokenizer vocabularies, sentencepiece."""


class SingleFileError(ValueError):
    """A single-file checkpoint cannot be loaded; the message is for the user."""


class ConfigFolderError(SingleFileError):
    """The config folder is missing, unreadable or of another family than the checkpoint."""


def pipeline_class(family: ModelFamily) -> Any:
    """The diffusers pipeline class that runs ``family`` (its architecture's)."""
    cls = PIPELINE_CLASSES.get(family.architecture)
    if cls is None:
        raise SingleFileError(f"No pipeline runs {family.display_name}.")
    return cls


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def config_folder_family(folder: Path) -> tuple[ModelFamily, str | None]:
    """The family of the diffusers folder ``folder`` from its configs alone (no weights read),
    with the variant :class:`CheckpointInfo` names (FLUX.1 dev/schnell, the SD3 sizes)."""
    if _read_json(folder / "model_index.json") is None:
        raise ConfigFolderError(
            f"The config folder '{folder}' is not a diffusers model folder: it has no readable "
            "model_index.json."
        )
    unet = _read_json(folder / "unet" / "config.json")
    if unet is not None:
        return family_from_unet_config(unet), None
    transformer = _read_json(folder / "transformer" / "config.json") or {}
    family = family_from_transformer(transformer.get("_class_name"), transformer)
    if family.architecture is F.FLUX:
        return family, "dev" if transformer.get("guidance_embeds") else "schnell"
    if family is F.SD3:  # as checkpoint_files names them: 2432 wide, or dual attention
        dual = bool(transformer.get("dual_attention_layers"))
        large = transformer_width(transformer) == 2432
        return family, "3.5-large" if large else "3.5-medium" if dual else "3-medium"
    return family, None


def check_config_folder(info: CheckpointInfo, folder: Path) -> None:
    """Raise :class:`ConfigFolderError` unless ``folder`` configures the checkpoint's model."""
    family, variant = config_folder_family(folder)
    wanted = info.family.display_name + (f" ({info.variant})" if info.variant else "")
    if family is not info.family or variant != info.variant:
        found = family.display_name + (f" ({variant})" if variant else "")
        raise ConfigFolderError(
            f"The config folder '{folder.name}' is {found}; the checkpoint is {wanted}. Use a "
            f"diffusers folder of {wanted} for its configs."
        )


def _config_view(folder: Path, scratch: Path) -> Path:
    """A copy of ``folder``'s config files only (see the module docstring for why)."""
    for source in folder.rglob("*"):
        if source.is_file() and source.suffix in CONFIG_SUFFIXES:
            if source.name.endswith(".index.json"):  # the map of a sharded model's weights
                continue
            target = scratch / source.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return scratch


def _second_clip(info: CheckpointInfo, path: Path, view: Path, dtype: torch.dtype) -> Any | None:
    """The second CLIP text encoder, built from its own tensors, where diffusers' choice by
    width would give it the first one's (two CLIP encoders of one width); else None."""
    clips = [encoder for encoder in info.text_encoders if encoder.label != "T5"]
    if len(clips) != 2 or clips[0].width != clips[1].width:
        return None
    prefix = clips[1].prefix
    with safe_open(str(path), framework="pt") as file:
        names = [name for name in file.keys() if name.startswith(prefix)]  # noqa: SIM118
        tensors = {name: file.get_tensor(name) for name in names}
    return create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection,  # SDXL's and SD3's second encoder
        checkpoint=tensors,
        subfolder="text_encoder_2",
        config=str(view),
        torch_dtype=dtype,
        local_files_only=True,
    )


def load_single_file(
    path: Path,
    config: Path,
    *,
    torch_dtype: torch.dtype = torch.float32,
    info: CheckpointInfo | None = None,
) -> Any:
    """The pipeline of the single-file checkpoint at ``path``, its configs, scheduler and
    tokenizers taken from the local diffusers folder ``config`` of the same family.

    ``info`` is the file's :func:`inspect_checkpoint` (read again when not given). Raises
    :class:`ConfigFolderError` for a config folder that does not fit, :class:`SingleFileError`
    for a checkpoint diffusers cannot convert, and the checkpoint's own refusals."""
    info = info or inspect_checkpoint(path)
    check_config_folder(info, config)
    if info.family is F.TINY_FLUX:
        raise SingleFileError(
            f"'{path.name}' is {info.family.display_name}: diffusers converts FLUX.1 single "
            "files only at FLUX.1's own width (3072)."
        )
    overrides: dict[str, Any] = {}
    if info.family.architecture is F.SD3 and not any(e.label == "T5" for e in info.text_encoders):
        overrides = {"text_encoder_3": None, "tokenizer_3": None}  # SD3 runs without T5
    with tempfile.TemporaryDirectory(prefix="single-file-config-") as scratch:
        view = _config_view(config, Path(scratch))
        second = _second_clip(info, path, view, torch_dtype)
        if second is not None:
            overrides["text_encoder_2"] = second
        try:
            return pipeline_class(info.family).from_single_file(
                str(path),
                config=str(view),
                local_files_only=True,
                torch_dtype=torch_dtype,
                **overrides,
            )
        except SingleFileComponentError as error:  # a component the file does not hold
            reason = str(error.message or error).splitlines()[0]
            raise SingleFileError(f"'{path.name}' cannot be loaded: {reason}") from error
