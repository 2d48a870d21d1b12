"""What a single-file checkpoint is, from its safetensors header: a full model of which family,
or something else (a LoRA, a VAE or a text encoder alone, a UNet without the rest).

Users bring single ``.safetensors`` files from CivitAI or from their A1111/ComfyUI model folders.
Those are in the layout of the code each family was released with, and the header's tensor
names and shapes say what is inside without reading any weights (``read_header`` bounds and
validates it). The names below are the ones A1111 and ComfyUI read (``comfy/model_detection.py``)
and that diffusers 0.42 converts (``loaders/single_file_utils.py``):

* SD 1.x / 2.x / SDXL: the UNet under ``model.diffusion_model.`` (``input_blocks``,
  ``middle_block``, ``output_blocks``); its cross-attention key input
  (``...transformer_blocks.0.attn2.to_k.weight``, shape ``[out, width]``) is the text width that
  names the family (``model_family.CROSS_ATTENTION_FAMILIES``: 768 SD 1.x, 1024 SD 2.x, 2048
  SDXL; 32/48/64 the tiny ones), and SDXL alone has ``label_emb`` (its size conditioning). Text
  encoders: Hugging Face CLIP under ``cond_stage_model.transformer.`` (SD 1.x), OpenCLIP under
  ``cond_stage_model.model.`` (SD 2.x), both side by side under ``conditioner.embedders.0/1``
  (SDXL). The VAE is under ``first_stage_model.``.
* SD3: SAI's MMDiT, ``joint_blocks.N.{x_block,context_block}``, with or without the
  ``model.diffusion_model.`` prefix; its width is the attention's input. SD3.5 Medium has
  ``x_block.attn2`` (dual attention), SD3.5 Large is 2432 wide. Text encoders under
  ``text_encoders.clip_l/clip_g/t5xxl.``; T5 is optional (SD3 runs without it).
* FLUX.1: ``double_blocks``/``single_blocks`` with or without the prefix; dev embeds the
  guidance scale (``guidance_in``), schnell does not. Black Forest Labs publish the transformer
  alone; ComfyUI's all-in-one files add ``vae.`` and ``text_encoders.clip_l/t5xxl.``.

Whether an SD 2.x model predicts v (768-v) or noise (512-base) is not in the weights: the
evidence says so, and the prediction type comes from the config folder or the user.

:func:`detect_checkpoint` classifies (and refuses what is not a model at all);
:func:`inspect_checkpoint` reads a file and also refuses what diffusers cannot load on its own.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from app.cores.lora_files.safetensors_file import TensorInfo, read_header
from app.cores.model_manager.model_family import (
    CROSS_ATTENTION_FAMILIES,
    ModelFamily,
    family_from_unet_config,
    transformer_family,
)

F = ModelFamily
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
_LORA = re.compile(r"lora|\.hada_[wt]\d|\.lokr_[wt]\d|\.dora_scale$|\.alpha$", re.IGNORECASE)


class RefusalKind(StrEnum):
    LORA = "lora"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"
    INCOMPLETE = "incomplete"
    """A UNet/transformer without its VAE or text encoders (diffusers needs them in the file)."""
    UNSUPPORTED = "unsupported"
    """A model of a kind this backend does not run (inpainting, SDXL refiner, FLUX.1 Fill...)."""
    UNKNOWN = "unknown"


class CheckpointRefused(ValueError):
    """The file is not a full model this backend can import; ``str()`` is the user's detail."""

    def __init__(self, kind: RefusalKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class TextEncoder:
    label: str
    """As the file's layout names it: ``CLIP``, ``OpenCLIP``, ``CLIP-L``, ``CLIP-G``, ``T5``."""
    prefix: str
    width: int


@dataclass(frozen=True)
class CheckpointInfo:
    family: ModelFamily
    evidence: str
    """Why, in a sentence a user can read (shown next to the family)."""
    has_vae: bool
    has_text_encoders: bool
    """Every text encoder the family needs is in the file (SD3's optional T5 aside)."""
    dtype: str
    """The safetensors dtype holding most of the weights (``F16``, ``BF16``, ``F32``...)."""
    parameter_count: int
    """Elements in all tensors of the file (denoiser, VAE, text encoders, EMA copies if any)."""
    variant: str | None = None
    """``dev``/``schnell`` (FLUX.1), ``3-medium``/``3.5-medium``/``3.5-large`` (SD3), else None."""
    text_encoders: tuple[TextEncoder, ...] = ()
    missing: tuple[str, ...] = ()
    """The parts diffusers needs that the file lacks (``the VAE``...); empty for a full model."""
    denoiser_prefix: str = UNET_PREFIX


@dataclass(frozen=True)
class _Slot:
    label: str
    prefix: str
    layout: Literal["hf", "openclip", "t5"]
    optional: bool = False


_CLIP_L = _Slot("CLIP-L", "text_encoders.clip_l.transformer.", "hf")
_T5 = _Slot("T5", "text_encoders.t5xxl.transformer.", "t5")
SLOTS: Mapping[ModelFamily, tuple[_Slot, ...]] = {
    F.SD1: (_Slot("CLIP", "cond_stage_model.transformer.", "hf"),),
    F.SD2: (_Slot("OpenCLIP", "cond_stage_model.model.", "openclip"),),
    F.SDXL: (
        _Slot("CLIP", "conditioner.embedders.0.transformer.", "hf"),
        _Slot("OpenCLIP", "conditioner.embedders.1.model.", "openclip"),
    ),
    F.SD3: (
        _CLIP_L,
        _Slot("CLIP-G", "text_encoders.clip_g.transformer.", "hf"),
        _Slot(_T5.label, _T5.prefix, "t5", optional=True),  # SD3 runs without T5
    ),
    F.FLUX: (_CLIP_L, _T5),
}
"""Where each architecture's files keep their text encoders (A1111/SGM, ComfyUI), in order."""
_WIDTH_KEYS = {
    "hf": "text_model.embeddings.token_embedding.weight",
    "openclip": "token_embedding.weight",
    "t5": "shared.weight",
}
_TEXT_PREFIXES = tuple(
    {s.prefix for slots in SLOTS.values() for s in slots} | {"conditioner.embedders."}
)


def _shape(tensors: Mapping[str, TensorInfo], key: str, dim: int) -> int | None:
    info = tensors.get(key)
    return info.shape[dim] if info is not None and len(info.shape) > dim else None


def _count(keys: list[str], pattern: str) -> int:
    return len({m[1] for key in keys if (m := re.match(pattern, key))})


def _text_encoders(
    tensors: Mapping[str, TensorInfo], architecture: ModelFamily
) -> tuple[list[TextEncoder], list[_Slot]]:
    """The text encoders of ``architecture``'s slots in the file, and the slots left empty."""
    found: list[TextEncoder] = []
    empty: list[_Slot] = []
    for slot in SLOTS[architecture]:
        width = _shape(tensors, slot.prefix + _WIDTH_KEYS[slot.layout], 1)
        if width is not None:
            found.append(TextEncoder(slot.label, slot.prefix, width))
        elif not slot.optional:
            empty.append(slot)
    return found, empty


@dataclass(frozen=True)
class _Denoiser:
    family: ModelFamily
    evidence: str
    pooled: int | None
    """The width its CLIP text encoders must add up to (cross-attention, or pooled input)."""
    context: int | None = None
    """The T5 width it reads (MMDiT)."""
    variant: str | None = None


def _unet(tensors: Mapping[str, TensorInfo], name: str) -> _Denoiser:
    in_channels = _shape(tensors, UNET_PREFIX + "input_blocks.0.0.weight", 1)
    if in_channels != 4:
        kind = {9: "an inpainting model", 8: "an InstructPix2Pix model"}.get(in_channels or 0)
        raise CheckpointRefused(
            RefusalKind.UNSUPPORTED,
            f"'{name}' is {kind or 'a UNet'} reading {in_channels} input channels; only "
            "text-to-image models (4 latent channels) can be imported.",
        )
    cross = {
        info.shape[1]
        for key, info in tensors.items()
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and len(info.shape) > 1
    }
    width = cross.pop() if len(cross) == 1 else None
    label_emb = UNET_PREFIX + "label_emb.0.0.weight" in tensors
    text_time = "text_time" if label_emb else None
    family = family_from_unet_config(
        {"cross_attention_dim": width, "addition_embed_type": text_time}
    )
    evidence = f"UNet with {width}-wide cross-attention" if width else "UNet"
    if label_emb:
        evidence += " and size conditioning (label_emb)"
    if family.known:
        return _Denoiser(family, evidence, width)
    if "conditioner.embedders.0.model.token_embedding.weight" in tensors:
        raise CheckpointRefused(
            RefusalKind.UNSUPPORTED,
            f"'{name}' is an SDXL refiner ({evidence}, one OpenCLIP text encoder): it refines "
            "images an SDXL base model made and cannot generate on its own.",
        )
    if width not in CROSS_ATTENTION_FAMILIES:
        widths = "cross-attention widths that differ" if cross else "no cross-attention"
        reason = "a width no known family has" if width else widths
    else:
        reason = "which only SDXL has, at 2048" if label_emb else "but no size conditioning"
    raise CheckpointRefused(RefusalKind.UNKNOWN, f"'{name}' has a {evidence}, {reason}.")


def _sd3(tensors: Mapping[str, TensorInfo], keys: list[str], prefix: str) -> _Denoiser:
    width = _shape(tensors, prefix + "joint_blocks.0.x_block.attn.qkv.weight", 1)
    family = transformer_family(F.SD3, width)
    blocks = _count(keys, re.escape(prefix) + r"joint_blocks\.(\d+)\.")
    dual = any(".x_block.attn2." in key for key in keys)
    variant = None
    if family is F.SD3:
        variant = "3.5-large" if width == 2432 else "3.5-medium" if dual else "3-medium"
    evidence = f"MMDiT {width} wide ({blocks} joint blocks{', dual attention' if dual else ''})"
    pooled = _shape(tensors, prefix + "y_embedder.mlp.0.weight", 1)
    context = _shape(tensors, prefix + "context_embedder.weight", 1)
    return _Denoiser(family, evidence, pooled, context, variant)


def _flux(tensors: Mapping[str, TensorInfo], keys: list[str], prefix: str, name: str) -> _Denoiser:
    width = _shape(tensors, prefix + "double_blocks.0.img_attn.qkv.weight", 1)
    image_in = _shape(tensors, prefix + "img_in.weight", 1)
    if image_in not in (None, 64):  # FLUX.1 Fill reads 384 channels, Depth and Canny 128
        raise CheckpointRefused(
            RefusalKind.UNSUPPORTED,
            f"'{name}' is a FLUX.1 variant reading {image_in} input channels (Fill, Depth or "
            "Canny), not a text-to-image model; FLUX.1 dev and schnell can be imported.",
        )
    double = _count(keys, re.escape(prefix) + r"double_blocks\.(\d+)\.")
    single = _count(keys, re.escape(prefix) + r"single_blocks\.(\d+)\.")
    dev = prefix + "guidance_in.in_layer.weight" in tensors
    evidence = (
        f"FLUX.1 transformer {width} wide (double-stream blocks: {double}, single-stream: "
        f"{single}) "
        + (
            "with guidance embedding (as FLUX.1 dev)"
            if dev
            else "without guidance embedding (as FLUX.1 schnell)"
        )
    )
    pooled = _shape(tensors, prefix + "vector_in.in_layer.weight", 1)
    context = _shape(tensors, prefix + "txt_in.weight", 1)
    family = transformer_family(F.FLUX, width)
    return _Denoiser(family, evidence, pooled, context, "dev" if dev else "schnell")


def _text_problem(denoiser: _Denoiser, encoders: list[TextEncoder]) -> str | None:
    """Why the text encoders cannot feed the denoiser, or None when they can."""
    clips = [e.width for e in encoders if e.label != "T5"]
    t5 = [e.width for e in encoders if e.label == "T5"]
    if clips and denoiser.pooled is not None and sum(clips) != denoiser.pooled:
        widths, reads = " + ".join(map(str, clips)), denoiser.pooled
        return f"its CLIP text encoders ({widths} wide) do not add up to the {reads} it reads"
    if t5 and denoiser.context is not None and t5[0] != denoiser.context:
        return f"its T5 text encoder is {t5[0]} wide, the transformer reads {denoiser.context}"
    return None


def _dtype_and_count(tensors: Mapping[str, TensorInfo]) -> tuple[str, int]:
    sizes: Counter[str] = Counter()
    for info in tensors.values():
        sizes[info.dtype] += info.numel
    return (sizes.most_common(1)[0][0] if sizes else "unknown"), sum(sizes.values())


_DIFFUSERS_DENOISER = (
    "down_blocks.",
    "mid_block.",
    "transformer_blocks.",
    "single_transformer_blocks.",
)
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_BARE_TEXT = re.compile(
    r"(text_model\.|embeddings\.|encoder\.(?:block\.|embed_tokens\.|final_layer_norm)|shared\.|"
    r"transformer\.resblocks\.|token_embedding|positional_embedding|ln_final|text_projection|"
    r"logit_scale)"
)


def _not_a_model(keys: list[str], name: str) -> CheckpointRefused:
    """The refusal for a file with no original-layout UNet or MMDiT: what it is instead."""
    if any(key.startswith(_DIFFUSERS_DENOISER) for key in keys):
        kind = "UNet" if any(key.startswith("down_blocks.") for key in keys) else "transformer"
        return CheckpointRefused(
            RefusalKind.INCOMPLETE,
            f"'{name}' is a {kind} alone in diffusers' layout (a diffusers folder's "
            f"{kind.lower()}/diffusion_pytorch_model.safetensors), without VAE or text "
            "encoders: import the whole diffusers folder instead.",
        )
    bare = [next((k[len(p) :] for p in VAE_PREFIXES if k.startswith(p)), k) for k in keys]
    if all(k.startswith(_VAE_PARTS) for k in bare) and any(k.startswith("decoder.") for k in bare):
        return CheckpointRefused(
            RefusalKind.VAE,
            f"'{name}' is a VAE alone (encoder and decoder weights, no UNet or text encoders), "
            "not a model. A VAE is not imported on its own (A1111 keeps them in models/VAE): "
            "import a checkpoint that includes its VAE, as most do.",
        )
    if all(k.startswith(_TEXT_PREFIXES) or _BARE_TEXT.match(k) for k in keys):
        what = "a T5" if any("SelfAttention" in key for key in keys) else "a CLIP"
        return CheckpointRefused(
            RefusalKind.TEXT_ENCODER,
            f"'{name}' is {what} text encoder alone (no UNet or transformer), not a model. A "
            "text encoder is not imported on its own (ComfyUI keeps them in "
            "models/text_encoders): import a checkpoint that includes its text encoders.",
        )
    return CheckpointRefused(
        RefusalKind.UNKNOWN,
        f"'{name}' is not a model this backend recognises: none of its {len(keys)} tensors is "
        "where SD 1.x/2.x/SDXL (model.diffusion_model.input_blocks), SD3 (joint_blocks) or "
        "FLUX.1 (double_blocks) keep their denoiser.",
    )


def detect_checkpoint(tensors: Mapping[str, TensorInfo], name: str) -> CheckpointInfo:
    """The family of the single-file checkpoint whose header lists ``tensors`` (``name``, the
    file's, is for messages). Raises :class:`CheckpointRefused` for what is not a model of a
    known family; a known denoiser without its VAE or text encoders comes back with ``missing``
    (:func:`require_complete` refuses it)."""
    keys = list(tensors)
    lora = next((key for key in keys if _LORA.search(key)), None)
    if lora is not None:
        raise CheckpointRefused(
            RefusalKind.LORA,
            f"'{name}' is a LoRA (it holds layers such as '{lora}'), not a model: add it with "
            "POST /loras/upload.",
        )
    prefix = UNET_PREFIX if any(key.startswith(UNET_PREFIX) for key in keys) else ""
    if UNET_PREFIX + "input_blocks.0.0.weight" in tensors:
        denoiser = _unet(tensors, name)
    elif prefix + "joint_blocks.0.x_block.attn.qkv.weight" in tensors:
        denoiser = _sd3(tensors, keys, prefix)
    elif prefix + "double_blocks.0.img_attn.qkv.weight" in tensors:
        denoiser = _flux(tensors, keys, prefix, name)
    else:
        raise _not_a_model(keys, name)
    family, evidence = denoiser.family, denoiser.evidence
    if not family.known:
        detail = f"'{name}' has a denoiser of no known family: {evidence}, a width none has."
        raise CheckpointRefused(RefusalKind.UNKNOWN, detail)

    encoders, empty = _text_encoders(tensors, family.architecture)
    has_vae = any(key.startswith(VAE_PREFIXES) and ".decoder." in key for key in keys)
    if encoders:
        plural = "s" if len(encoders) > 1 else ""
        widths = " + ".join(f"{e.label} {e.width}" for e in encoders)
        evidence += f"; text encoder{plural} {widths} wide"
    if family.architecture is F.SD3 and not any(e.label == "T5" for e in encoders):
        evidence += " (no T5: SD3 runs without it)"
    evidence += "; VAE" if has_vae else "; no VAE"
    problem = _text_problem(denoiser, encoders)
    if problem is not None:
        detail = f"'{name}' does not hold together: {evidence}, but {problem}."
        raise CheckpointRefused(RefusalKind.UNKNOWN, detail)
    if family.architecture is F.SD2:
        evidence += (
            ". Whether it predicts v (SD 2.x 768-v) or noise (512-base) is not in the weights: "
            "it comes from the config or from you"
        )
    missing = ([] if has_vae else ["the VAE"]) + [f"the {s.label} text encoder" for s in empty]
    dtype, count = _dtype_and_count(tensors)
    return CheckpointInfo(
        family=family,
        evidence=evidence,
        has_vae=has_vae,
        has_text_encoders=not empty,
        dtype=dtype,
        parameter_count=count,
        variant=denoiser.variant,
        text_encoders=tuple(encoders),
        missing=tuple(missing),
        denoiser_prefix=prefix,
    )


def require_complete(info: CheckpointInfo, name: str) -> CheckpointInfo:
    """``info`` when diffusers can load the file on its own; else :class:`CheckpointRefused`
    naming what is missing. (diffusers' single-file loading takes every component's weights
    from the file and only configs from elsewhere: a UNet alone cannot become a pipeline.)"""
    if not info.missing:
        return info
    kind = "UNet" if info.family.architecture in (F.SD1, F.SD2, F.SDXL) else "transformer"
    *others, last = info.missing
    missing = f"{', '.join(others)} and {last}" if others else last
    detail = (
        f"'{name}' holds the {kind} of {info.family.display_name} without {missing}. "
        "Single-file models load only with their VAE and text encoders in the same file (a "
        "'full' or 'pruned' checkpoint, as CivitAI and A1111 use)"
    )
    if info.family.architecture is F.FLUX:
        detail += (
            "; Black Forest Labs publish the FLUX.1 transformer alone: import the FLUX.1 "
            "diffusers folder, or an all-in-one file such as ComfyUI's flux1-dev-fp8"
        )
    raise CheckpointRefused(RefusalKind.INCOMPLETE, detail + ".")


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Read the header of the ``.safetensors`` file at ``path`` (bounded, no tensor data) and
    say which full model it is. Raises ``SafetensorsError`` (a ``ValueError``) for a file that
    is not well-formed safetensors and :class:`CheckpointRefused` for anything but a full model
    of a known family."""
    header = read_header(path)
    return require_complete(detect_checkpoint(header.tensors, path.name), path.name)
