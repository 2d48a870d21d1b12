"""Public types of the upload check and the helpers its messages share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "InvalidLoRAError",
    "LoRAFormat",
    "LoRAInspection",
    "examples",
    "first_line",
]

_EXAMPLES = 3


class LoRAFormat(StrEnum):
    KOHYA = "kohya"
    """A1111/Kohya names: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha``; ``lora_te_`` (``lora_te1_``/``lora_te2_`` for SDXL) for text encoders."""
    PEFT = "peft"
    """diffusers/PEFT names: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (optionally
    ``.lora_B.bias``, ``.lora_magnitude_vector`` for DoRA), ``text_encoder.<module>...``."""
    DIFFUSERS_LEGACY = "diffusers_legacy"
    """Old diffusers attention-processor names, still converted by diffusers 0.42:
    ``unet.<block>.attn1.processor.to_q_lora.down.weight``, ``unet.<module>.lora.down.weight``,
    ``text_encoder.<block>.self_attn.to_q_lora.down.weight``,
    ``text_encoder.<module>.lora_linear_layer.down.weight``."""
    XLABS = "xlabs"
    """XLabs' FLUX.1 attention processors: ``double_blocks.0.processor.qkv_lora1.down.weight``."""


class InvalidLoRAError(ValueError):
    """The file is not a LoRA that diffusers can apply; the message says why, for an end user."""


@dataclass(frozen=True)
class LoRAInspection:
    format: LoRAFormat
    components: tuple[str, ...]
    """Pipeline components the LoRA targets, e.g. ``("unet",)`` or ``("unet", "text_encoder")``."""
    network_type: str
    """The file's most specific layer type: ``"dora"`` (PEFT ``lora_magnitude_vector`` or
    Kohya/LyCORIS ``dora_scale``), ``"lokr"``, ``"loha"``, ``"full"`` (LyCORIS ``.diff``),
    ``"locon"`` (convolutions beyond the 1x1 attention projections, or Tucker ``lora_mid``)
    or ``"lora"``."""
    layer_count: int
    ranks: tuple[int, ...]
    """Distinct ranks, sorted."""
    layer_ranks: tuple[int, ...] = field(default=(), compare=False)
    """The rank of each layer, in file order (for the most common rank)."""


def examples(names: Iterable[str]) -> str:
    """The first few names, quoted, for a message."""
    listed = list(names)
    shown = ", ".join(f"'{name}'" for name in listed[:_EXAMPLES])
    return shown + (", ..." if len(listed) > _EXAMPLES else "")


def first_line(error: BaseException) -> str:
    """A short one-line description of ``error`` for a message."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].rstrip(":").strip()[:300]
