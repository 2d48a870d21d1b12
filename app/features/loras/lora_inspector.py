"""Classify LoRA files and check that a LoRA fits a loaded pipeline before applying it.

Two checks, both refusing with a sentence an end user can act on:

* :func:`inspect_lora_header` (at upload) looks only at the safetensors header (names, dtypes,
  shapes, metadata; no tensor data): which key format the file uses, which model parts it
  targets, and whether diffusers 0.42 + peft 0.21 can apply it to a Stable Diffusion pipeline
  at all. It refuses full checkpoints, unrelated files, LoRA variants diffusers cannot apply
  (LoHa, LoKr, (IA)³, OFT, GLoRA, Kohya DoRA, ...), incomplete or inconsistent layers and mixed
  formats, and finally runs diffusers' own key conversion on placeholder tensors, so a file it
  accepts is one diffusers can read.
* :func:`check_lora_fits_pipeline` (at generation, before touching the pipeline's adapters)
  converts the real file with the pipeline's own ``lora_state_dict`` and the same per-component
  conversion diffusers applies when loading, then checks every layer against the loaded model:
  the target module must exist and every LoRA matrix must have the size peft will create for
  it. diffusers itself would apply a LoRA partially when some layers do not exist, or fail half
  way with a size mismatch; this check refuses both up front and never modifies the pipeline.

What diffusers 0.42.1 does with each variant on ``StableDiffusionPipeline`` was measured on
the tiny embedded pipeline (see the tests and ``/work/shared`` notes).
"""

from __future__ import annotations

import collections
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from app.features.loras.safetensors_file import (
    SafetensorsError,
    SafetensorsHeader,
    TensorInfo,
    read_header,
)

__all__ = [
    "IncompatibleLoRAError",
    "InvalidLoRAError",
    "LoRAFormat",
    "LoRAInspection",
    "check_lora_fits_pipeline",
    "inspect_lora_header",
]

logger = logging.getLogger(__name__)


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


class InvalidLoRAError(ValueError):
    """The file is not a LoRA that diffusers can apply; the message says why, for an end user."""


class IncompatibleLoRAError(InvalidLoRAError):
    """A valid LoRA that does not fit the loaded model (other architecture or sizes)."""

    def __init__(
        self,
        message: str,
        *,
        display_name: str,
        total_layers: int,
        missing_layers: tuple[str, ...] = (),
        mismatched_layers: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.display_name = display_name
        self.total_layers = total_layers
        self.missing_layers = missing_layers
        """``component: module`` names the loaded model does not have."""
        self.mismatched_layers = mismatched_layers
        """One description per layer whose sizes do not fit."""


@dataclass(frozen=True)
class LoRAInspection:
    format: LoRAFormat
    components: tuple[str, ...]
    """Pipeline components the LoRA targets, e.g. ``("unet",)`` or ``("unet", "text_encoder")``."""
    network_type: str
    """``"lora"``, ``"locon"`` (also convolution layers beyond the 1x1 attention projections)
    or ``"dora"`` (PEFT DoRA: ``lora_magnitude_vector``)."""
    layer_count: int
    ranks: tuple[int, ...]
    """Distinct ranks, sorted."""
    layer_ranks: tuple[int, ...] = field(default=(), compare=False)
    """The rank of each layer, in file order (for the most common rank)."""


# ---------------------------------------------------------------------------------------------
# Key grammar

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
_KNOWN_COMPONENTS = (
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
_UNSUPPORTED_VARIANTS: tuple[tuple[re.Pattern[str], str], ...] = (
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

_LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_CROSS_ATTENTION_MODELS = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}
_EXAMPLES = 3


@dataclass
class _Layer:
    component: str
    module: str
    """As named in the file: underscored for Kohya, dotted otherwise."""
    tensors: dict[str, tuple[str, TensorInfo]] = field(default_factory=dict)
    """role -> (file key, info)."""


@dataclass
class _ParsedKey:
    format: LoRAFormat
    component: str
    module: str
    role: str


def _parse_key(key: str) -> _ParsedKey | None:
    kohya = _KOHYA_KEY.match(key)
    if kohya is not None:
        role = _KOHYA_ROLES.get(kohya["suffix"])
        if role is None:
            return None
        return _ParsedKey(LoRAFormat.KOHYA, _KOHYA_COMPONENTS[kohya["part"]], kohya["module"], role)
    component, dot, rest = key.partition(".")
    if not dot:
        return None
    peft = _PEFT_KEY.match(rest)
    if peft is not None:
        return _ParsedKey(LoRAFormat.PEFT, component, peft["module"], _PEFT_ROLES[peft["suffix"]])
    is_text = component.startswith("text_encoder")
    processor = _LEGACY_PROCESSOR_KEY.match(rest)
    if processor is not None:
        targets = _TEXT_PROCESSOR_TARGETS if is_text else _UNET_PROCESSOR_TARGETS
        module = f"{processor['parent']}.{targets[processor['proj']]}"
        return _ParsedKey(LoRAFormat.DIFFUSERS_LEGACY, component, module, processor["role"])
    legacy = (_LEGACY_TEXT_KEY if is_text else _LEGACY_UNET_KEY).match(rest)
    if legacy is not None:
        return _ParsedKey(LoRAFormat.DIFFUSERS_LEGACY, component, legacy["module"], legacy["role"])
    return None


def _examples(names: Iterable[str]) -> str:
    listed = list(names)
    shown = ", ".join(f"'{name}'" for name in listed[:_EXAMPLES])
    return shown + (", ..." if len(listed) > _EXAMPLES else "")


def _component_order(component: str) -> tuple[int, str]:
    if component in _KNOWN_COMPONENTS:
        return (_KNOWN_COMPONENTS.index(component), component)
    return (len(_KNOWN_COMPONENTS), component)


# ---------------------------------------------------------------------------------------------
# Upload-time inspection (header only)


def inspect_lora_header(header: SafetensorsHeader) -> LoRAInspection:
    """Classify a LoRA from its safetensors header alone; raise :class:`InvalidLoRAError` if it
    is not a LoRA that diffusers can apply to a Stable Diffusion pipeline."""
    if header.invalid_metadata_keys:
        raise InvalidLoRAError(
            "The file's metadata has entries that are not text "
            f"({_examples(header.invalid_metadata_keys)}); the safetensors loader refuses such "
            "files."
        )
    keys = list(header.tensors)
    for pattern, message in _UNSUPPORTED_VARIANTS:
        if any(pattern.search(key) for key in keys):
            raise InvalidLoRAError(message)

    parsed: dict[str, _ParsedKey] = {}
    unknown: list[str] = []
    for key in keys:
        result = _parse_key(key)
        if result is None:
            unknown.append(key)
        else:
            parsed[key] = result
    if not parsed:
        raise InvalidLoRAError(_describe_non_lora(keys))
    if unknown:
        raise InvalidLoRAError(
            f"{len(unknown)} of the file's {len(keys)} tensors are not LoRA weights "
            f"({_examples(unknown)}); diffusers refuses files with such entries."
        )

    formats = {item.format for item in parsed.values()}
    if len(formats) > 1:
        names = " and ".join(sorted(fmt.value for fmt in formats))
        raise InvalidLoRAError(
            f"The file mixes LoRA key formats ({names}); diffusers can only read one at a time."
        )
    fmt = formats.pop()

    unknown_components = sorted({p.component for p in parsed.values()} - set(_KNOWN_COMPONENTS))
    if unknown_components:
        raise InvalidLoRAError(
            "The LoRA's layer names do not say which part of the model they belong to (they start "
            f"with {_examples(c + '.' for c in unknown_components)} instead of 'unet.' or "
            "'text_encoder.'); diffusers would silently load nothing from it."
        )

    layers: dict[tuple[str, str], _Layer] = {}
    for key, item in parsed.items():
        layer = layers.setdefault(
            (item.component, item.module), _Layer(item.component, item.module)
        )
        if item.role in layer.tensors:
            raise InvalidLoRAError(
                f"Layer '{item.module}' has two {item.role} weights "
                f"('{layer.tensors[item.role][0]}' and '{key}')."
            )
        layer.tensors[item.role] = (key, header.tensors[key])

    layer_ranks: list[int] = []
    convolution = False
    for layer in layers.values():
        rank, is_conv = _check_layer(layer)
        layer_ranks.append(rank)
        convolution = convolution or is_conv

    if _LORA_ADAPTER_METADATA_KEY in header.metadata:
        _check_adapter_metadata(header.metadata[_LORA_ADAPTER_METADATA_KEY], layers.values())

    _dry_run_diffusers_conversion(header)

    if any("magnitude" in layer.tensors for layer in layers.values()):
        network_type = "dora"
    elif convolution:
        network_type = "locon"
    else:
        network_type = "lora"
    components = tuple(sorted({c for c, _ in layers}, key=_component_order))
    return LoRAInspection(
        format=fmt,
        components=components,
        network_type=network_type,
        layer_count=len(layers),
        ranks=tuple(sorted(set(layer_ranks))),
        layer_ranks=tuple(layer_ranks),
    )


def _describe_non_lora(keys: list[str]) -> str:
    if any(key.startswith(_CHECKPOINT_PREFIXES) for key in keys) or (
        sum(1 for key in keys if _DIFFUSERS_MODEL_KEY.match(key)) >= max(1, len(keys) // 2)
    ):
        return (
            "This file looks like a full model checkpoint, not a LoRA: it has no LoRA weights. "
            "Add it as a model instead."
        )
    if set(keys) <= _EMBEDDING_KEYS:
        return "This file looks like a textual-inversion embedding, not a LoRA."
    return f"No LoRA weights found in this file (it contains {_examples(keys)})."


def _check_layer(layer: _Layer) -> tuple[int, bool]:
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


def _check_adapter_metadata(raw: str, layers: Iterable[_Layer]) -> None:
    try:
        config = json.loads(raw)
    except ValueError:
        raise InvalidLoRAError(
            f"The file's '{_LORA_ADAPTER_METADATA_KEY}' metadata is not valid JSON."
        ) from None
    if not isinstance(config, dict):
        raise InvalidLoRAError(
            f"The file's '{_LORA_ADAPTER_METADATA_KEY}' metadata is not an object."
        )
    if any("alpha" in layer.tensors for layer in layers):
        raise InvalidLoRAError(
            f"The file has both per-layer alpha values and '{_LORA_ADAPTER_METADATA_KEY}' "
            "metadata; diffusers refuses that combination."
        )


def _dry_run_diffusers_conversion(header: SafetensorsHeader) -> None:
    """Run diffusers' Stable Diffusion key conversion on placeholder tensors (no data read)."""
    import torch
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    placeholders: dict[str, Any] = {}
    for key, info in header.tensors.items():
        if key.endswith(".alpha"):
            placeholders[key] = torch.ones(())
        else:
            placeholders[key] = torch.empty(info.shape, device="meta")
    try:
        state_dict, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(placeholders)
        for component, part in _split_components(state_dict).items():
            _convert_component(component, part, keep_text_model=False)
    except InvalidLoRAError:
        raise
    except Exception as error:
        raise InvalidLoRAError(f"diffusers cannot read this LoRA: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].rstrip(":").strip()[:300]


# ---------------------------------------------------------------------------------------------
# diffusers' per-component conversion (mirrors load_lora_adapter / _load_lora_into_text_encoder)


def _split_components(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = value
    return parts


def _convert_component(
    component: str, state_dict: dict[str, Any], *, keep_text_model: bool
) -> dict[str, Any]:
    """Turn one component's keys into the PEFT keys diffusers loads for it."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if not state_dict:
        return state_dict
    if component.startswith("text_encoder"):
        try:
            converted: dict[str, Any] = convert_state_dict_to_peft(
                convert_state_dict_to_diffusers(state_dict)
            )
        except ValueError as error:
            raise InvalidLoRAError(
                "diffusers cannot tell the key format of the text-encoder layers of this LoRA "
                f"({_first_line(error)}); it recognises Kohya text-encoder layers only when "
                "out_proj or MLP layers are among them."
            ) from None
        if not keep_text_model:
            # transformers 5's CLIPTextModel has no `text_model` level; diffusers strips it.
            converted = {key.removeprefix("text_model."): v for key, v in converted.items()}
        return converted
    # diffusers converts the whole component when its first key is not in PEFT form.
    if "lora_A" not in next(iter(state_dict)):
        return dict(convert_unet_state_dict_to_peft(state_dict))
    return state_dict


# ---------------------------------------------------------------------------------------------
# Generation-time fit check


@dataclass
class _LoRAModule:
    tensors: dict[str, Any] = field(default_factory=dict)
    """role (``A``, ``B``, ``bias``, ``magnitude``) -> tensor."""


_PEFT_SUFFIXES = {
    "_A.weight": "A",
    "_B.weight": "B",
    "_B.bias": "bias",
    "_magnitude_vector": "magnitude",
}


def check_lora_fits_pipeline(path: Path, pipeline: Any, display_name: str) -> None:
    """Refuse (:class:`InvalidLoRAError`, :class:`IncompatibleLoRAError`) a LoRA that diffusers
    would not apply completely and correctly to ``pipeline``. Reads the file; never modifies
    the pipeline."""
    label = f"LoRA '{display_name}'"
    try:
        header = read_header(path)
        inspect_lora_header(header)
    except (SafetensorsError, InvalidLoRAError) as error:
        raise InvalidLoRAError(f"{label} cannot be used: {error}") from None

    if not hasattr(type(pipeline), "lora_state_dict"):
        raise IncompatibleLoRAError(
            f"{label} cannot be used: the loaded model does not support LoRAs.",
            display_name=display_name,
            total_layers=0,
        )
    try:
        state_dict, network_alphas, metadata = type(pipeline).lora_state_dict(
            str(path), use_safetensors=True, return_lora_metadata=True
        )
    except Exception as error:
        raise InvalidLoRAError(
            f"{label} cannot be used: diffusers cannot read it ({_first_line(error)})."
        ) from None
    if not state_dict:
        raise InvalidLoRAError(f"{label} cannot be used: it contains no LoRA layers.")
    if not all("lora" in key for key in state_dict):
        raise InvalidLoRAError(
            f"{label} cannot be used: diffusers does not accept its layer names."
        )
    if network_alphas and metadata:
        raise InvalidLoRAError(
            f"{label} cannot be used: it has both per-layer alphas and adapter metadata."
        )

    loadable = getattr(type(pipeline), "_lora_loadable_modules", ["unet", "text_encoder"])
    components: dict[str, Any] = {}
    for name in loadable:
        component = getattr(pipeline, name, None)
        if component is not None and hasattr(component, "named_modules"):
            components[name] = component

    missing: list[str] = []
    mismatched: list[str] = []
    cross_attention: list[tuple[int, int]] = []
    total = 0
    for component_name, part in _split_components(state_dict).items():
        component = components.get(component_name)
        if component is None:
            try:
                named = _convert_component(component_name, part, keep_text_model=False)
            except InvalidLoRAError:
                named = part
            modules_in_file = {key.split(".lora")[0] for key in named}
            total += len(modules_in_file)
            missing.extend(f"{component_name}.{module}" for module in sorted(modules_in_file))
            continue
        try:
            converted = _convert_component(
                component_name, part, keep_text_model=hasattr(component, "text_model")
            )
        except InvalidLoRAError as error:
            raise InvalidLoRAError(f"{label} cannot be used: {error}") from None
        if metadata:
            _check_component_metadata(label, component_name, metadata)
        lora_modules = _group_modules(label, converted)
        total += len(lora_modules)
        model_modules = dict(component.named_modules())
        for module_name, lora in lora_modules.items():
            target = model_modules.get(module_name)
            if target is None:
                missing.append(f"{component_name}.{module_name}")
                continue
            problem = _shape_problem(f"{component_name}.{module_name}", target, lora.tensors)
            if problem is None:
                continue
            mismatched.append(problem[0])
            if problem[1] is not None:
                cross_attention.append(problem[1])

    if missing or mismatched:
        raise IncompatibleLoRAError(
            _incompatibility_message(label, total, missing, mismatched, cross_attention),
            display_name=display_name,
            total_layers=total,
            missing_layers=tuple(missing),
            mismatched_layers=tuple(mismatched),
        )
    _warn_about_mixed_alphas(label, network_alphas)


def _group_modules(label: str, state_dict: Mapping[str, Any]) -> dict[str, _LoRAModule]:
    modules: dict[str, _LoRAModule] = {}
    for key, tensor in state_dict.items():
        module_name, marker, suffix = key.partition(".lora")
        role = _PEFT_SUFFIXES.get(suffix) if marker else None
        if role is None:
            raise InvalidLoRAError(
                f"{label} cannot be used: diffusers would not understand its layer '{key}'."
            )
        modules.setdefault(module_name, _LoRAModule()).tensors[role] = tensor
    for module_name, module in modules.items():
        if "A" not in module.tensors or "B" not in module.tensors:
            raise InvalidLoRAError(
                f"{label} cannot be used: layer '{module_name}' lacks its A or B weight."
            )
    return modules


def _shape_problem(
    module_name: str, target: Any, tensors: Mapping[str, Any]
) -> tuple[str, tuple[int, int] | None] | None:
    """Describe why the LoRA tensors do not fit ``target``; ``None`` when they do.

    The second element is (LoRA width, model width) for a cross-attention key/value
    projection whose input width differs.
    """
    import torch

    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    lora_a = tuple(tensors["A"].shape)
    lora_b = tuple(tensors["B"].shape)
    rank = lora_a[0]
    lora_in = lora_a[1] if len(lora_a) > 1 else 0
    lora_out = lora_b[0]
    if isinstance(base, torch.nn.Linear):
        model_in, model_out = base.in_features, base.out_features
        expected_a: tuple[int, ...] = (rank, model_in)
        expected_b: tuple[int, ...] = (model_out, rank)
        expected_magnitude: tuple[int, ...] = (model_out,)
        kind = "linear layer"
    elif isinstance(base, torch.nn.Conv2d):
        model_in, model_out = base.in_channels, base.out_channels
        kernel = tuple(base.kernel_size)
        expected_a = (rank, model_in, *kernel)
        expected_b = (model_out, rank // base.groups, 1, 1)
        expected_magnitude = (1, model_out, 1, 1)
        kind = f"{kernel[0]}x{kernel[1]} convolution"
    else:
        return (f"layer {module_name} is a {type(base).__name__}, which LoRA cannot target", None)

    bias = tensors.get("bias")
    magnitude = tensors.get("magnitude")
    fits = (
        lora_a == expected_a
        and lora_b == expected_b
        and (bias is None or tuple(bias.shape) == (model_out,))
        and (magnitude is None or tuple(magnitude.shape) == expected_magnitude)
    )
    if fits:
        return None
    cross = None
    if module_name.endswith(("attn2.to_k", "attn2.to_v")) and lora_in != model_in:
        cross = (lora_in, model_in)
    if (lora_in, lora_out) != (model_in, model_out):
        return (
            f"layer {module_name} expects input width {lora_in} / output width {lora_out}; "
            f"the loaded model has {model_in}/{model_out}",
            cross,
        )
    return (
        f"layer {module_name} is a {kind} in the loaded model but the LoRA's weights have "
        f"shapes {lora_a} and {lora_b}",
        None,
    )


def _check_component_metadata(label: str, component: str, metadata: Mapping[str, Any]) -> None:
    """diffusers builds the component's ``LoraConfig`` from the file's adapter metadata."""
    from peft import LoraConfig

    prefix = f"{component}."
    config = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    if not config:
        return
    try:
        LoraConfig(**config)
    except (TypeError, ValueError) as error:
        raise InvalidLoRAError(
            f"{label} cannot be used: its adapter metadata for {component} is not a valid "
            f"LoRA configuration ({_first_line(error)})."
        ) from None


def _incompatibility_message(
    label: str,
    total: int,
    missing: list[str],
    mismatched: list[str],
    cross_attention: list[tuple[int, int]],
) -> str:
    sentences: list[str] = []
    if cross_attention:
        lora_width, model_width = cross_attention[0]
        model = _CROSS_ATTENTION_MODELS.get(lora_width)
        made_for = f"{lora_width}-wide cross-attention" + (f" ({model})" if model else "")
        sentences.append(
            f"{label} was made for a model with {made_for}; the loaded model has {model_width}."
        )
        sentences.append(f"{len(mismatched)} of {total} layers do not fit.")
    elif mismatched:
        sentences.append(
            f"{label} does not fit the loaded model: {len(mismatched)} of {total} layers have "
            f"other sizes (e.g. {mismatched[0]})."
        )
    if missing:
        text = (
            f"{len(missing)} of {total} layers target modules the loaded model does not have "
            f"(e.g. {_examples(missing)})."
        )
        sentences.append(text if sentences else f"{label} does not fit the loaded model: {text}")
    return " ".join(sentences)


def _warn_about_mixed_alphas(label: str, network_alphas: Mapping[str, float] | None) -> None:
    if not network_alphas:
        return
    counts = collections.Counter(network_alphas.values())
    if len(counts) > 1:
        common = counts.most_common(1)[0][0]
        logger.warning(
            "%s sets different alpha values per layer (%s); diffusers applies the most common "
            "one (%g) to every layer, so it may look different than in other tools.",
            label,
            ", ".join(f"{value:g}" for value in sorted(counts)),
            common,
        )
