"""Which family a model belongs to, so that LoRAs made for another family can be refused early.

A LoRA only fits the architecture it was trained on: an SDXL LoRA cannot be applied to a
Stable Diffusion 1.x model, and the error diffusers gives for it (a size mismatch half way
through loading) means nothing to a user. Both sides are therefore classified into the same
small set of families: the loaded model here, from the configs diffusers read from its folder
(computed once per load), and each LoRA from its keys and tensor shapes
(``app.features.loras.base_model``).

The rules for a UNet model use the width of its cross-attention input (the text encoder's
hidden size): 768 is Stable Diffusion 1.x (CLIP ViT-L), 1024 is 2.x (OpenCLIP ViT-H), 2048
together with ``addition_embed_type == "text_time"`` is SDXL (CLIP-L + OpenCLIP bigG). MMDiT
models are recognised by their transformer class. The embedded default model is a tiny
SD-shaped UNet with 32-wide cross-attention: its own family, ``tiny``, so that LoRAs written
for it count as compatible and real SD LoRAs do not.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class ModelFamily(StrEnum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SD3 = "sd3"
    FLUX = "flux"
    TINY = "tiny"
    UNKNOWN = "unknown"

    @property
    def display_name(self) -> str:
        return _DISPLAY_NAMES[self]

    @property
    def known(self) -> bool:
        return self is not ModelFamily.UNKNOWN


_DISPLAY_NAMES = {
    ModelFamily.SD1: "Stable Diffusion 1.x",
    ModelFamily.SD2: "Stable Diffusion 2.x",
    ModelFamily.SDXL: "SDXL",
    ModelFamily.SD3: "Stable Diffusion 3",
    ModelFamily.FLUX: "FLUX.1",
    ModelFamily.TINY: "the tiny embedded test model",
    ModelFamily.UNKNOWN: "an unrecognised model",
}

TINY_CROSS_ATTENTION_DIM = 32
"""The embedded model's cross-attention width (``embedded_model._CROSS_ATTENTION_DIM``)."""

CROSS_ATTENTION_FAMILIES: Mapping[int, ModelFamily] = {
    TINY_CROSS_ATTENTION_DIM: ModelFamily.TINY,
    768: ModelFamily.SD1,
    1024: ModelFamily.SD2,
    2048: ModelFamily.SDXL,
}
"""Cross-attention input width (the text encoder's hidden size) of each UNet family."""

_TRANSFORMER_FAMILIES = {
    "SD3Transformer2DModel": ModelFamily.SD3,
    "FluxTransformer2DModel": ModelFamily.FLUX,
}


def family_from_unet_config(config: Mapping[str, Any]) -> ModelFamily:
    """The family of a ``UNet2DConditionModel`` from its config (``unet/config.json``)."""
    width = config.get("cross_attention_dim")
    if isinstance(width, list | tuple):
        widths = set(width)
        width = widths.pop() if len(widths) == 1 else None
    if not isinstance(width, int) or isinstance(width, bool):
        return ModelFamily.UNKNOWN
    family = CROSS_ATTENTION_FAMILIES.get(width, ModelFamily.UNKNOWN)
    text_time = config.get("addition_embed_type") == "text_time"
    # SDXL conditions on pooled text and image sizes ("text_time"); the others do not. A
    # 2048-wide UNet without it, or a 768-wide one with it, is something else.
    if (family is ModelFamily.SDXL) != text_time:
        return ModelFamily.UNKNOWN
    return family


def family_from_transformer_class(class_name: str | None) -> ModelFamily:
    return _TRANSFORMER_FAMILIES.get(class_name or "", ModelFamily.UNKNOWN)


def family_of_pipeline(pipeline: Any) -> ModelFamily:
    """The family of a loaded diffusers pipeline, from its denoiser's config."""
    unet = getattr(pipeline, "unet", None)
    if unet is not None and hasattr(unet, "config"):
        return family_from_unet_config(dict(unet.config))
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None:
        return family_from_transformer_class(type(transformer).__name__)
    return ModelFamily.UNKNOWN
