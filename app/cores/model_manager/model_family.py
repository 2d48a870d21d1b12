"""Which family a model belongs to, so that LoRAs made for another family can be refused early.

A LoRA only fits the architecture it was trained on: an SDXL LoRA cannot be applied to a
Stable Diffusion 1.x model, and the error diffusers gives for it (a size mismatch half way
through loading) means nothing to a user. Both sides are therefore classified into the same
small set of families: the loaded model here, from the configs diffusers read from its folder
(computed once per load), and each LoRA from its keys and tensor shapes
(``app.cores.lora_files.base_model``).

A family is an architecture at one size. Besides the real ones (SD 1.x, SD 2.x, SDXL, SD3,
FLUX.1) there are the tiny test models, each its own family at the same architecture:
``tiny`` is the embedded default model (SD 1.x-shaped, 32-wide cross-attention, its name
predates the others and is stored in LoRA records), and ``tiny-sd2``, ``tiny-sdxl``,
``tiny-sd3``, ``tiny-flux`` are the test suite's family models. A LoRA written for a tiny
model counts as compatible with it and with nothing else, and a real one never fits a tiny
model: their layers have other widths. :attr:`ModelFamily.architecture` gives the
architecture either way (the LoRA engine picks key mappings by it).

The rules for the loaded model, from its denoiser's config first:

* UNet (``UNet2DConditionModel``): the width of its cross-attention input, which is the
  width of the text it reads: 768 is SD 1.x (CLIP ViT-L), 1024 is 2.x (OpenCLIP ViT-H), 2048
  together with ``addition_embed_type == "text_time"`` is SDXL (CLIP-L and OpenCLIP bigG
  side by side, plus image-size conditioning); 32, 48 and 64 (with ``text_time``) are the
  tiny SD 1.x, 2.x and SDXL models.
* MMDiT: the transformer class names the architecture (``SD3Transformer2DModel``,
  ``FluxTransformer2DModel``) and its width (heads x head size) the size: SD3 Medium and
  SD3.5 Medium are 1536 wide, SD3.5 Large 2432, FLUX.1 3072; the tiny ones 32.
* The text encoders must feed what the denoiser reads: the CLIP encoders' widths add up to the
  UNet's cross-attention width (SDXL has two, the others one) or to an MMDiT's pooled
  projection (two for SD3, one for FLUX.1), and a T5 encoder's width is the MMDiT's
  ``joint_attention_dim``. A pipeline without text encoders, or SD3 without its T5 (which it
  runs without), is judged by its denoiser alone.
* A diffusers pipeline class that names an architecture (``StableDiffusionXL...``,
  ``StableDiffusion3...``, ``Flux...``, other ``StableDiffusion...``) must agree.

Whatever contradicts itself is ``unknown``: then no LoRA is refused for its family, and the
size check at generation decides, which is the safe side of a wrong guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ModelFamily(StrEnum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SD3 = "sd3"
    FLUX = "flux"
    TINY = "tiny"
    """The embedded default model (SD 1.x architecture)."""
    TINY_SD2 = "tiny-sd2"
    TINY_SDXL = "tiny-sdxl"
    TINY_SD3 = "tiny-sd3"
    TINY_FLUX = "tiny-flux"
    UNKNOWN = "unknown"

    @property
    def display_name(self) -> str:
        return _DISPLAY_NAMES[self]

    @property
    def known(self) -> bool:
        return self is not ModelFamily.UNKNOWN

    @property
    def architecture(self) -> ModelFamily:
        """The real family whose architecture this one has: itself for the real ones,
        ``SDXL`` for ``TINY_SDXL``, ``SD1`` for ``TINY``; ``UNKNOWN`` for ``UNKNOWN``."""
        return _ARCHITECTURES.get(self, self)

    @property
    def is_tiny(self) -> bool:
        """One of the tiny test models (the embedded one or a test-suite family model)."""
        return self in _ARCHITECTURES


_ARCHITECTURES = {
    ModelFamily.TINY: ModelFamily.SD1,
    ModelFamily.TINY_SD2: ModelFamily.SD2,
    ModelFamily.TINY_SDXL: ModelFamily.SDXL,
    ModelFamily.TINY_SD3: ModelFamily.SD3,
    ModelFamily.TINY_FLUX: ModelFamily.FLUX,
}

_DISPLAY_NAMES = {
    ModelFamily.SD1: "Stable Diffusion 1.x",
    ModelFamily.SD2: "Stable Diffusion 2.x",
    ModelFamily.SDXL: "SDXL",
    ModelFamily.SD3: "Stable Diffusion 3",
    ModelFamily.FLUX: "FLUX.1",
    ModelFamily.TINY: "the tiny embedded test model",
    ModelFamily.TINY_SD2: "the tiny SD 2.x test model",
    ModelFamily.TINY_SDXL: "the tiny SDXL test model",
    ModelFamily.TINY_SD3: "the tiny SD3 test model",
    ModelFamily.TINY_FLUX: "the tiny FLUX.1 test model",
    ModelFamily.UNKNOWN: "an unrecognised model",
}

TINY_CROSS_ATTENTION_DIM = 32
"""The embedded model's cross-attention width (``embedded_model._CROSS_ATTENTION_DIM``)."""
TINY_SD2_CROSS_ATTENTION_DIM = 48
"""The tiny SD 2.x test model's text width (``tests/factories/family_models.SD2_TEXT_WIDTH``)."""
TINY_SDXL_CROSS_ATTENTION_DIM = 64
"""The tiny SDXL test model's: two 32-wide text encoders side by side."""
TINY_TRANSFORMER_WIDTH = 32
"""The tiny SD3 and FLUX.1 test models' transformer width (heads x head size)."""

CROSS_ATTENTION_FAMILIES: Mapping[int, ModelFamily] = {
    TINY_CROSS_ATTENTION_DIM: ModelFamily.TINY,
    TINY_SD2_CROSS_ATTENTION_DIM: ModelFamily.TINY_SD2,
    TINY_SDXL_CROSS_ATTENTION_DIM: ModelFamily.TINY_SDXL,
    768: ModelFamily.SD1,
    1024: ModelFamily.SD2,
    2048: ModelFamily.SDXL,
}
"""Cross-attention input width (the text encoders' width) of each UNet family."""

TRANSFORMER_WIDTHS: Mapping[ModelFamily, frozenset[int]] = {
    ModelFamily.SD3: frozenset({1536, 2432}),  # 3 / 3.5 Medium, 3.5 Large
    ModelFamily.FLUX: frozenset({3072}),
    ModelFamily.TINY_SD3: frozenset({TINY_TRANSFORMER_WIDTH}),
    ModelFamily.TINY_FLUX: frozenset({TINY_TRANSFORMER_WIDTH}),
}
"""Hidden width of each MMDiT family's transformer blocks."""

# What the layers of each family look like, for reading LoRA files (``base_model``).
_SD_WIDTHS = frozenset({320, 640, 1280})
_TINY_WIDTHS = frozenset({32, 64})  # the tiny UNets' block_out_channels
ATTENTION_WIDTHS: Mapping[ModelFamily, frozenset[int]] = {
    ModelFamily.SD1: _SD_WIDTHS,
    ModelFamily.SD2: _SD_WIDTHS,
    ModelFamily.SDXL: frozenset({640, 1280}),  # no attention in its 320-wide blocks
    ModelFamily.TINY: _TINY_WIDTHS,
    ModelFamily.TINY_SD2: _TINY_WIDTHS,
    ModelFamily.TINY_SDXL: frozenset({64}),  # likewise, none in its 32-wide blocks
}
"""Widths of each UNet family's attention layers."""
UNET_BLOCK_WIDTHS = {f: _TINY_WIDTHS if f.is_tiny else _SD_WIDTHS for f in ATTENTION_WIDTHS}
"""Channel widths of each UNet family's blocks (resnets): real and tiny, no finer."""
TEXT_ENCODER_WIDTHS: Mapping[int, frozenset[ModelFamily]] = {
    768: frozenset({ModelFamily.SD1, ModelFamily.SDXL}),  # CLIP ViT-L
    1024: frozenset({ModelFamily.SD2}),  # OpenCLIP ViT-H
    # The embedded model's CLIP, and each of the tiny SDXL's two.
    TINY_CROSS_ATTENTION_DIM: frozenset({ModelFamily.TINY, ModelFamily.TINY_SDXL}),
    TINY_SD2_CROSS_ATTENTION_DIM: frozenset({ModelFamily.TINY_SD2}),
}
"""Width of the (first) CLIP text encoder of the UNet families."""
SECOND_TEXT_ENCODER_WIDTHS: Mapping[int, frozenset[ModelFamily]] = {
    1280: frozenset({ModelFamily.SDXL}),  # OpenCLIP bigG
    TINY_SDXL_CROSS_ATTENTION_DIM - TINY_CROSS_ATTENTION_DIM: frozenset({ModelFamily.TINY_SDXL}),
}
TINY_T5_WIDTH = 64
"""The tiny SD3 and FLUX.1 test models' T5 width (``tests/factories/family_models.T5_WIDTH``)."""
T5_WIDTHS: Mapping[int, frozenset[ModelFamily]] = {
    4096: frozenset({ModelFamily.SD3, ModelFamily.FLUX}),  # T5 v1.1 XXL
    TINY_T5_WIDTH: frozenset({ModelFamily.TINY_SD3, ModelFamily.TINY_FLUX}),
}

_TRANSFORMER_CLASSES = {
    "SD3Transformer2DModel": ModelFamily.SD3,
    "FluxTransformer2DModel": ModelFamily.FLUX,
}
_CLIP_COUNTS = {
    ModelFamily.SD1: 1,
    ModelFamily.SD2: 1,
    ModelFamily.SDXL: 2,
    ModelFamily.SD3: 2,
    ModelFamily.FLUX: 1,
}
# Longest prefix first: "StableDiffusion" alone covers the SD 1.x/2.x pipelines (text to
# image, image to image, inpainting, ControlNet).
_PIPELINE_PREFIXES: Sequence[tuple[str, frozenset[ModelFamily]]] = (
    ("StableDiffusionXL", frozenset({ModelFamily.SDXL})),
    ("StableDiffusion3", frozenset({ModelFamily.SD3})),
    ("Flux", frozenset({ModelFamily.FLUX})),
    ("StableDiffusion", frozenset({ModelFamily.SD1, ModelFamily.SD2})),
)
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def transformer_family(architecture: ModelFamily, width: int | None) -> ModelFamily:
    """The MMDiT family of ``architecture`` (``SD3``/``FLUX``) that is ``width`` wide."""
    for family, widths in TRANSFORMER_WIDTHS.items():
        if family.architecture is architecture and width in widths:
            return family
    return ModelFamily.UNKNOWN


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _cross_attention_width(config: Mapping[str, Any]) -> int | None:
    width = config.get("cross_attention_dim")
    if isinstance(width, list | tuple):  # one per block; every real model repeats one value
        widths = set(width)
        width = widths.pop() if len(widths) == 1 else None
    return _int(width)


def family_from_unet_config(config: Mapping[str, Any]) -> ModelFamily:
    """The family of a ``UNet2DConditionModel`` from its config (``unet/config.json``)."""
    family = CROSS_ATTENTION_FAMILIES.get(_cross_attention_width(config) or 0, ModelFamily.UNKNOWN)
    text_time = config.get("addition_embed_type") == "text_time"
    # SDXL conditions on pooled text and image sizes ("text_time"); the others do not. A
    # 2048-wide UNet without it (or a 768-wide one with it) is something else.
    if family.known and (family.architecture is ModelFamily.SDXL) != text_time:
        return ModelFamily.UNKNOWN
    return family


def transformer_width(config: Mapping[str, Any]) -> int | None:
    """An MMDiT's hidden width, ``num_attention_heads x attention_head_dim``."""
    heads, head_dim = (
        _int(config.get("num_attention_heads")),
        _int(config.get("attention_head_dim")),
    )
    return heads * head_dim if heads is not None and head_dim is not None else None


def family_from_transformer(class_name: str | None, config: Mapping[str, Any]) -> ModelFamily:
    """The family of an MMDiT denoiser from its class name and config."""
    architecture = _TRANSFORMER_CLASSES.get(class_name or "")
    if architecture is None:
        return ModelFamily.UNKNOWN
    return transformer_family(architecture, transformer_width(config))


# ---------------------------------------------------------------------------------------------
# The loaded pipeline, with the evidence


@dataclass(frozen=True)
class PipelineDetection:
    family: ModelFamily
    evidence: str
    """Why, in a short sentence a user can read (logged at load, shown next to the family)."""


@dataclass(frozen=True)
class _Text:
    clip: list[int]
    """Widths of the CLIP text encoders present, in pipeline order."""
    t5: int | None
    widths: list[int]
    """Every text encoder's width, in pipeline order (for the evidence)."""


def _text_encoders(pipeline: Any) -> _Text:
    clip: list[int] = []
    t5: int | None = None
    widths: list[int] = []
    for name in _TEXT_ENCODERS:
        config = getattr(getattr(pipeline, name, None), "config", None)
        if config is None:
            continue
        # T5 configs name the width d_model, CLIP configs hidden_size.
        d_model = _int(getattr(config, "d_model", None))
        hidden = _int(getattr(config, "hidden_size", None))
        if d_model is not None:
            t5 = d_model
            widths.append(d_model)
        elif hidden is not None:
            clip.append(hidden)
            widths.append(hidden)
    return _Text(clip, t5, widths)


def _text_problem(
    family: ModelFamily, text: _Text, clip_target: int | None, t5_target: int | None
) -> str | None:
    """Why the text encoders cannot feed the denoiser, or None when they can (or are absent)."""
    clips = " + ".join(str(width) for width in text.clip)
    expected = _CLIP_COUNTS[family.architecture]
    if text.clip and len(text.clip) != expected:
        count = "one CLIP text encoder" if expected == 1 else f"{expected} CLIP text encoders"
        return (
            f"{family.architecture.display_name} reads {count}; the pipeline has {len(text.clip)}"
        )
    if text.clip and clip_target is not None and sum(text.clip) != clip_target:
        return f"its CLIP text encoders ({clips} wide) do not add up to the {clip_target} it reads"
    if text.t5 is not None and t5_target is not None and text.t5 != t5_target:
        return f"its T5 text encoder is {text.t5} wide, the transformer reads {t5_target}"
    return None


def _unet_evidence(config: Mapping[str, Any]) -> tuple[ModelFamily, str, int | None]:
    width = _cross_attention_width(config)
    text_time = config.get("addition_embed_type") == "text_time"
    described = f"UNet with {width}-wide cross-attention" if width else "UNet"
    if text_time:
        described += " and text_time conditioning"
    family = family_from_unet_config(config)
    if family.known:
        return family, described, width
    if width not in CROSS_ATTENTION_FAMILIES:
        return family, f"{described}, a width no known family has", width
    if text_time:
        return family, f"{described}, which only SDXL has (at 2048)", width
    return family, f"{described} but no text_time conditioning (SDXL has both)", width


def _transformer_evidence(class_name: str, config: Mapping[str, Any]) -> tuple[ModelFamily, str]:
    width = transformer_width(config)
    family = family_from_transformer(class_name, config)
    architecture = _TRANSFORMER_CLASSES.get(class_name)
    if architecture is None:
        return family, f"{class_name}, not a model family LoRAs are checked for"
    described = f"{class_name} {width} wide" if width else class_name
    if not family.known:
        sizes = sorted(TRANSFORMER_WIDTHS[architecture])
        return family, f"{described}; {architecture.display_name} is {' or '.join(map(str, sizes))}"
    blocks = _int(config.get("num_layers"))
    if architecture is ModelFamily.SD3:
        return family, f"{described} (joint blocks: {blocks})"
    single = _int(config.get("num_single_layers"))
    described += f" (double-stream blocks: {blocks}, single-stream: {single})"
    if config.get("guidance_embeds"):
        return family, f"{described} with guidance embedding (as FLUX.1 dev)"
    return family, f"{described} without guidance embedding (as FLUX.1 schnell)"


def _pipeline_architectures(class_name: str) -> frozenset[ModelFamily]:
    for prefix, architectures in _PIPELINE_PREFIXES:
        if class_name.startswith(prefix) and class_name.endswith("Pipeline"):
            return architectures
    return frozenset()


def detect_pipeline(pipeline: Any) -> PipelineDetection:
    """The family of a loaded diffusers pipeline and why (see the module docstring)."""
    unet = getattr(pipeline, "unet", None)
    transformer = getattr(pipeline, "transformer", None)
    text = _text_encoders(pipeline)
    if unet is not None and getattr(unet, "config", None) is not None:
        family, evidence, cross = _unet_evidence(dict(unet.config))
        clip_target, t5_target = cross, None
    elif transformer is not None and getattr(transformer, "config", None) is not None:
        config = dict(transformer.config)
        family, evidence = _transformer_evidence(type(transformer).__name__, config)
        clip_target = _int(config.get("pooled_projection_dim"))
        t5_target = _int(config.get("joint_attention_dim"))
    else:
        return PipelineDetection(ModelFamily.UNKNOWN, "no UNet or transformer to read")

    if text.widths:
        widths = " + ".join(str(width) for width in text.widths)
        plural = "s" if len(text.widths) > 1 else ""
        evidence += f"; text encoder{plural} {widths} wide"
    class_name = type(pipeline).__name__
    expected = _pipeline_architectures(class_name)
    if expected:
        evidence += f" ({class_name})"
    if not family.known:
        return PipelineDetection(family, evidence)
    problem = _text_problem(family, text, clip_target, t5_target)
    if problem is not None:
        return PipelineDetection(ModelFamily.UNKNOWN, f"{evidence}, but {problem}")
    if expected and family.architecture not in expected:
        runs = " or ".join(sorted(architecture.display_name for architecture in expected))
        return PipelineDetection(ModelFamily.UNKNOWN, f"{evidence}, but {class_name} runs {runs}")
    return PipelineDetection(family, evidence)


def family_of_pipeline(pipeline: Any) -> ModelFamily:
    """The family of a loaded diffusers pipeline, from its configs."""
    return detect_pipeline(pipeline).family


# ---------------------------------------------------------------------------------------------
# Compatibility of a LoRA with the loaded model


def is_compatible(lora: str | None, model: ModelFamily | None) -> bool | None:
    """True/False when both families are known; None when either is not. ``lora`` is the
    stored family value: a tiny variant fits only its own tiny model, a real family only
    itself."""
    if model is None or not model.known or lora is None or lora == ModelFamily.UNKNOWN.value:
        return None
    return lora == model.value


def incompatibility_message(name: str, lora: ModelFamily, model: ModelFamily) -> str:
    return (
        f"LoRA '{name}' was made for {lora.display_name}; the loaded model is "
        f"{model.display_name}. Load a {lora.display_name} model to use it, or choose LoRAs "
        f"made for {model.display_name}."
    )
