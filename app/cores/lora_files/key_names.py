"""What the upload check reads from key names alone: formats, components, refusals.

The grammar of the layers themselves (roles, kinds, alphas) is the engine's
(:mod:`app.cores.lora_files.key_grammar`); this module adds what a user sees about a file
before any model is loaded: which naming convention it follows (``format``), which model
parts it changes (``components``), the LoRA variants no supported path applies, and what a
file that is not a LoRA probably is. Used by
:func:`app.cores.lora_files.inspection.inspect_lora_header`.
"""

from __future__ import annotations

import re

from app.cores.lora_files.inspection_types import LoRAFormat, examples

__all__ = [
    "FLOAT_DTYPES",
    "KNOWN_COMPONENTS",
    "TORCH_LOADABLE_DTYPES",
    "UNSUPPORTED_VARIANTS",
    "component_of",
    "component_order",
    "describe_non_lora",
    "key_format",
]

KNOWN_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline components a LoRA can change, in the order they are listed."""

_KOHYA_PARTS = (
    ("lora_unet_", "denoiser"),
    ("lora_transformer_", "denoiser"),
    ("lycoris_", "denoiser"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
)
_DOTTED_PARTS = {
    "unet": "unet",
    "transformer": "transformer",
    "diffusion_model": "transformer",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "text_encoder_3": "text_encoder_3",
    # XLabs names FLUX.1's blocks without a prefix.
    "double_blocks": "transformer",
    "single_blocks": "transformer",
}
_UNET_BLOCKS = re.compile(
    r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)"
)
_MMDIT_BLOCKS = re.compile(r"(double_blocks|single_blocks|joint_blocks|transformer_blocks)_\d")
_LEGACY = re.compile(r"(\.lora\.(down|up)\.weight|\.lora_linear_layer\.|_lora\.(down|up)\.weight)$")


def component_of(name: str) -> str | None:
    """The pipeline component a layer name belongs to; None when its prefix names none.
    Kohya calls every denoiser ``unet``; an MMDiT's layers are the ``transformer``'s."""
    for prefix, part in _KOHYA_PARTS:
        if name.startswith(prefix):
            if part != "denoiser":
                return part
            if _UNET_BLOCKS.search(name) or not _MMDIT_BLOCKS.search(name):
                return "unet"
            return "transformer"
    return _DOTTED_PARTS.get(name.split(".", 1)[0])


def component_order(component: str) -> tuple[int, str]:
    if component in KNOWN_COMPONENTS:
        return (KNOWN_COMPONENTS.index(component), component)
    return (len(KNOWN_COMPONENTS), component)


def key_format(key: str) -> LoRAFormat:
    """The naming convention of one tensor name."""
    if key.startswith(("lora_unet_", "lora_te", "lora_transformer_", "lycoris_")):
        return LoRAFormat.KOHYA
    if ".processor." in key and key.startswith(
        ("double_blocks.", "single_blocks.", "diffusion_model.")
    ):
        return LoRAFormat.XLABS
    if _LEGACY.search(key) or re.search(r"\.(to_q|to_k|to_v|to_out)_lora\.", key):
        return LoRAFormat.DIFFUSERS_LEGACY
    return LoRAFormat.PEFT


# Variants no supported path applies, found by a marker in any key; checked in order, the
# first match names the problem. The formats A1111/ComfyUI apply, the engine applies too;
# these no major UI applies (PEFT's (IA)³ ``ia3_l`` vectors are not LyCORIS's ``.on_input``).
_NOT_YET = "the backend applies LoRA, LoCon, LoHa, LoKr, full, DoRA, GLoRA and LyCORIS (IA)³ layers"
UNSUPPORTED_VARIANTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|[._])ia3_"), f"PEFT (IA)³ (ia3_*) LoRAs are not supported: {_NOT_YET}."),
    (re.compile(r"(^|[._])boft_"), f"BOFT (boft_*) LoRAs are not supported: {_NOT_YET}."),
    (re.compile(r"(^|[._])vera_"), f"VeRA LoRAs are not supported: {_NOT_YET}."),
    (re.compile(r"\.lora_E(\.|$)"), f"AdaLoRA (lora_E) files are not supported: {_NOT_YET}."),
    (
        re.compile(r"^bundle_emb\."),
        "LoRAs with bundled textual-inversion embeddings (bundle_emb.*) are not supported.",
    ),
)

_CHECKPOINT_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.embedders.",
    "model.model.",
    "diffusion_model.",
)
_DIFFUSERS_MODEL_KEY = re.compile(
    r"^(down_blocks|up_blocks|mid_block|conv_in|conv_out|time_embedding|encoder|decoder|"
    r"text_model|transformer_blocks|single_transformer_blocks)\..*\.(weight|bias)$"
)
_EMBEDDING_KEYS = frozenset(
    {"emb_params", "clip_l", "clip_g", "string_to_param", "string_to_token"}
)

# dtypes the safetensors torch loader can turn into tensors, and the floating ones among them.
TORCH_LOADABLE_DTYPES = frozenset(
    {
        "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64",
        "F16", "BF16", "F32", "F64", "C64",
        "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    }
)  # fmt: skip
FLOAT_DTYPES = frozenset(
    {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)


def describe_non_lora(keys: list[str]) -> str:
    if any(key.startswith(_CHECKPOINT_PREFIXES) for key in keys) or (
        sum(1 for key in keys if _DIFFUSERS_MODEL_KEY.match(key)) >= max(1, len(keys) // 2)
    ):
        return (
            "This file looks like a full model checkpoint, not a LoRA: it has no LoRA weights. "
            "Add it as a model instead."
        )
    if set(keys) <= _EMBEDDING_KEYS:
        return "This file looks like a textual-inversion embedding, not a LoRA."
    return f"No LoRA weights found in this file (it contains {examples(keys)})."
