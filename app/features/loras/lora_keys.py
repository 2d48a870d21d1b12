"""The LoRA key grammar and the header-only checks of single layers.

Parses safetensors key names into (format, component, module, role), knows the markers of the
LoRA variants diffusers cannot apply and the names of non-LoRA files, and validates each layer's
tensors (dtypes, shapes, ranks) from the header alone. Used by
:func:`app.features.loras.lora_inspector.inspect_lora_header`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from app.features.loras.lora_types import InvalidLoRAError, LoRAFormat, examples
from app.features.loras.safetensors_file import TensorInfo

__all__ = [
    "KNOWN_COMPONENTS",
    "LORA_ADAPTER_METADATA_KEY",
    "UNSUPPORTED_VARIANTS",
    "KeyLayer",
    "ParsedKey",
    "check_adapter_metadata",
    "check_layer",
    "component_order",
    "describe_non_lora",
    "parse_key",
]

_KOHYA_KEY = re.compile(r"^lora_(?P<part>unet|te1|te2|te)_(?P<module>[^.]+)\.(?P<suffix>.+)$")
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_KOHYA_COMPONENTS = {
    "unet": "unet",
    "te": "text_encoder",
    "te1": "text_encoder",
    "te2": "text_encoder_2",
}

_PEFT_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<suffix>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$"
)
_PEFT_ROLES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_B.bias": "bias",
    "lora_magnitude_vector": "magnitude",
}

# Old diffusers names. The processor form names the attention block and the projection.
_LEGACY_PROCESSOR_KEY = re.compile(
    r"^(?P<parent>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
_LEGACY_UNET_KEY = re.compile(r"^(?P<module>.+?)\.lora\.(?P<role>down|up)\.weight$")
_LEGACY_TEXT_KEY = re.compile(r"^(?P<module>.+?)\.lora_linear_layer\.(?P<role>down|up)\.weight$")
_UNET_PROCESSOR_TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR_TARGETS = {
    "to_q": "q_proj",
    "to_k": "k_proj",
    "to_v": "v_proj",
    "to_out": "out_proj",
}

# Top-level names diffusers uses for the parts a LoRA can target.
KNOWN_COMPONENTS = (
    "unet",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "transformer",
    "prior",
)

# Variants diffusers 0.42 + peft 0.21 cannot apply to a Stable Diffusion pipeline, found by a
# marker in any key. Checked in order; the first match names the problem.
_NOT_PLAIN = "diffusers can only apply plain LoRA layers to Stable Diffusion models"
UNSUPPORTED_VARIANTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|[._])hada_"), f"LoHa (hada_*) LoRAs are not supported: {_NOT_PLAIN}."),
    (
        re.compile(r"(^|[._])lokr_"),
        "LoKr (lokr_*) LoRAs are not supported: diffusers applies LoKr only to a few "
        "transformer models, not to Stable Diffusion.",
    ),
    (
        re.compile(r"(^|[._])ia3_|\.on_input$"),
        f"(IA)³ LoRAs are not supported: {_NOT_PLAIN}.",
    ),
    (re.compile(r"(^|[._])b?oft_"), f"OFT/BOFT (oft_*) LoRAs are not supported: {_NOT_PLAIN}."),
    (re.compile(r"\.[ab][12]\.weight$"), f"GLoRA LoRAs are not supported: {_NOT_PLAIN}."),
    (re.compile(r"(^|[._])vera_"), f"VeRA LoRAs are not supported: {_NOT_PLAIN}."),
    (re.compile(r"\.lora_E(\.|$)"), f"AdaLoRA (lora_E) files are not supported: {_NOT_PLAIN}."),
    (
        re.compile(r"\.diff(_b)?$"),
        f"LyCORIS full weight differences (.diff/.diff_b) are not supported: {_NOT_PLAIN}.",
    ),
    (
        re.compile(r"\.lora_mid\."),
        f"LoCon with Tucker decomposition (lora_mid) is not supported: {_NOT_PLAIN}.",
    ),
    (
        re.compile(r"\.dora_scale$"),
        "DoRA LoRAs in Kohya format (dora_scale) are not supported: diffusers drops their "
        "dora_scale weights and would apply them wrongly.",
    ),
    (
        re.compile(r"\.(w_norm|b_norm)$"),
        f"LyCORIS norm-layer weights (w_norm/b_norm) are not supported: {_NOT_PLAIN}.",
    ),
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
_TORCH_LOADABLE_DTYPES = frozenset(
    {
        "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64",
        "F16", "BF16", "F32", "F64", "C64",
        "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    }
)  # fmt: skip
_FLOAT_DTYPES = frozenset(
    {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


@dataclass
class KeyLayer:
    component: str
    module: str
    """As named in the file: underscored for Kohya, dotted otherwise."""
    tensors: dict[str, tuple[str, TensorInfo]] = field(default_factory=dict)
    """role -> (file key, info)."""


@dataclass
class ParsedKey:
    format: LoRAFormat
    component: str
    module: str
    role: str


def parse_key(key: str) -> ParsedKey | None:
    kohya = _KOHYA_KEY.match(key)
    if kohya is not None:
        role = _KOHYA_ROLES.get(kohya["suffix"])
        if role is None:
            return None
        return ParsedKey(LoRAFormat.KOHYA, _KOHYA_COMPONENTS[kohya["part"]], kohya["module"], role)
    component, dot, rest = key.partition(".")
    if not dot:
        return None
    peft = _PEFT_KEY.match(rest)
    if peft is not None:
        return ParsedKey(LoRAFormat.PEFT, component, peft["module"], _PEFT_ROLES[peft["suffix"]])
    is_text = component.startswith("text_encoder")
    processor = _LEGACY_PROCESSOR_KEY.match(rest)
    if processor is not None:
        targets = _TEXT_PROCESSOR_TARGETS if is_text else _UNET_PROCESSOR_TARGETS
        module = f"{processor['parent']}.{targets[processor['proj']]}"
        return ParsedKey(LoRAFormat.DIFFUSERS_LEGACY, component, module, processor["role"])
    legacy = (_LEGACY_TEXT_KEY if is_text else _LEGACY_UNET_KEY).match(rest)
    if legacy is not None:
        return ParsedKey(LoRAFormat.DIFFUSERS_LEGACY, component, legacy["module"], legacy["role"])
    return None


def component_order(component: str) -> tuple[int, str]:
    if component in KNOWN_COMPONENTS:
        return (KNOWN_COMPONENTS.index(component), component)
    return (len(KNOWN_COMPONENTS), component)


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


def check_layer(layer: KeyLayer) -> tuple[int, bool]:
    """Validate one layer's tensors; return its rank and whether it is a convolution LoCon adds."""
    name = layer.module
    down = layer.tensors.get("down")
    up = layer.tensors.get("up")
    if down is None and up is None:
        roles = ", ".join(sorted(layer.tensors))
        raise InvalidLoRAError(f"Layer '{name}' has only {roles} and no LoRA weights.")
    if down is None:
        raise InvalidLoRAError(f"Layer '{name}' has an up/B weight but no down/A weight.")
    if up is None:
        raise InvalidLoRAError(f"Layer '{name}' has a down/A weight but no up/B weight.")
    for role, (key, info) in layer.tensors.items():
        if info.dtype not in _TORCH_LOADABLE_DTYPES:
            raise InvalidLoRAError(
                f"Tensor '{key}' uses the {info.dtype} type, which cannot be loaded."
            )
        if role != "alpha" and info.dtype not in _FLOAT_DTYPES:
            raise InvalidLoRAError(f"Tensor '{key}' holds {info.dtype} values, not floating point.")
    down_shape, up_shape = down[1].shape, up[1].shape
    if len(down_shape) not in (2, 4) or len(up_shape) != len(down_shape):
        raise InvalidLoRAError(
            f"Layer '{name}' has weights of shapes {down_shape} and {up_shape}: not a LoRA layer."
        )
    rank = down_shape[0]
    if up_shape[1] != rank:
        raise InvalidLoRAError(
            f"Layer '{name}' is inconsistent: its down/A weight has rank {rank} but its up/B "
            f"weight has rank {up_shape[1]}."
        )
    if rank == 0:
        raise InvalidLoRAError(f"Layer '{name}' has rank 0.")
    if len(up_shape) == 4 and up_shape[2:] != (1, 1):
        raise InvalidLoRAError(f"Layer '{name}' has an up/B weight with a {up_shape[2:]} kernel.")
    alpha = layer.tensors.get("alpha")
    if alpha is not None and alpha[1].numel != 1:
        raise InvalidLoRAError(f"Layer '{name}' has an alpha that is not a single number.")
    out_features = up_shape[0]
    bias = layer.tensors.get("bias")
    if bias is not None and bias[1].shape != (out_features,):
        raise InvalidLoRAError(f"Layer '{name}' has a bias of shape {bias[1].shape}.")
    magnitude = layer.tensors.get("magnitude")
    if magnitude is not None and magnitude[1].numel != out_features:
        raise InvalidLoRAError(
            f"Layer '{name}' has a DoRA magnitude of shape {magnitude[1].shape}."
        )
    is_locon = len(down_shape) == 4 and (
        down_shape[2:] != (1, 1) or not name.endswith(("proj_in", "proj_out"))
    )
    return rank, is_locon


def check_adapter_metadata(raw: str, layers: Iterable[KeyLayer]) -> None:
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested thousands of levels deep
        raise InvalidLoRAError(
            f"The file's '{LORA_ADAPTER_METADATA_KEY}' metadata is not valid JSON."
        ) from None
    if not isinstance(config, dict):
        raise InvalidLoRAError(
            f"The file's '{LORA_ADAPTER_METADATA_KEY}' metadata is not an object."
        )
    if any("alpha" in layer.tensors for layer in layers):
        raise InvalidLoRAError(
            f"The file has both per-layer alpha values and '{LORA_ADAPTER_METADATA_KEY}' "
            "metadata; diffusers refuses that combination."
        )
