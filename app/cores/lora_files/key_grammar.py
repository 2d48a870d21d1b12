"""The key grammar of LoRA files: tensor names -> one :class:`FileLayer` per module.

Every trainer names a tensor ``<module><role suffix>``; the module part is whatever the
trainer calls the layer (Kohya ``lora_unet_down_blocks_0_..._to_q``, diffusers
``unet.down_blocks.0....to_q``, BFL ``diffusion_model.double_blocks.0.img_attn.qkv``, XLabs
``double_blocks.0.processor.qkv_lora1``); where it lands in the loaded model is decided later
(:mod:`~app.cores.lora_engine.key_mapping`). The suffixes are the formats' own:

* LoRA/LoCon: Kohya ``.lora_down.weight``/``.lora_up.weight``/``.lora_mid.weight`` (Tucker),
  PEFT ``.lora_A.weight``/``.lora_B.weight``/``.lora_B.bias``, XLabs and old diffusers
  ``.down.weight``/``.up.weight`` (``.lora.down.weight``, ``_lora.down.weight``,
  ``.lora_linear_layer.down.weight``);
* LyCORIS LoHa ``.hada_w1_a`` ..., LoKr ``.lokr_w1`` ..., full ``.diff``/``.diff_b``, norms
  ``.w_norm``/``.b_norm``;
* per-layer ``.alpha``; DoRA: Kohya/LyCORIS ``.dora_scale``, PEFT ``.lora_magnitude_vector``;
* LyCORIS GLoRA ``.a1.weight``/``.a2.weight``/``.b1.weight``/``.b2.weight``;
* LyCORIS (IA)³ ``.weight`` + ``.on_input`` (a bare ``.weight`` is (IA)³'s only beside an
  ``.on_input`` of the same module: alone it is a model weight, not a LoRA tensor).

The same grammar serves the upload check (tensor shapes from the header, no data read: the
tensors are ``meta`` tensors) and the engine (real tensors).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from app.cores.lora_files.layers import (
    ROLES,
    WEIGHT_DEPENDENT,
    DoRA,
    DoRAAxis,
    DoRAStrength,
    FileLayer,
    LayerKind,
)

__all__ = ["LORA_ADAPTER_METADATA_KEY", "LoRAFileError", "read_layers", "split_key"]

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
"""diffusers writes PEFT's ``LoraConfig`` of each component here, as JSON."""

_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "bias"),
    (".lora_magnitude_vector", "magnitude"),
    (".dora_scale", "dora_scale"),
    (".alpha", "alpha"),
    *((f".{role}", role) for role in sorted(ROLES[LayerKind.LOHA] | ROLES[LayerKind.LOKR])),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".w_norm", "w_norm"),
    (".b_norm", "b_norm"),
    (".on_input", "on_input"),
    (".oft_blocks", "oft_blocks"),
    (".oft_diag", "oft_diag"),
    *((f".{role}.weight", role) for role in sorted(ROLES[LayerKind.GLORA])),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".down.weight", "down"),
    (".up.weight", "up"),
)
# Old diffusers attention processors: ``<block>.processor.to_q_lora.down.weight`` (UNet) and
# ``<block>.self_attn.to_q_lora.down.weight`` (text encoder) name the projection separately.
_PROCESSOR = re.compile(
    r"^(?P<parent>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
_UNET_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class LoRAFileError(ValueError):
    """The file's tensors do not form LoRA layers; the message says why, for an end user."""


def split_key(key: str) -> tuple[str, str] | None:
    """(module as the file names it, role), or None for a name no LoRA format has."""
    processor = _PROCESSOR.match(key)
    if processor is not None:
        parent = processor["parent"]
        text = parent.startswith(("text_encoder", "lora_te"))
        projection = (_TEXT_PROJECTIONS if text else _UNET_PROJECTIONS)[processor["proj"]]
        return f"{parent}.{projection}", processor["role"]
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _kind(name: str, roles: set[str]) -> LayerKind:
    weight_roles = roles - {"alpha", "dora_scale", "magnitude"}
    if not weight_roles:
        listed = ", ".join(sorted(roles))
        raise LoRAFileError(f"Layer '{name}' has only {listed} and no LoRA weights.")
    kinds = [kind for kind, allowed in ROLES.items() if weight_roles <= allowed]
    if len(kinds) != 1:
        listed = ", ".join(sorted(roles))
        raise LoRAFileError(f"Layer '{name}' has tensors ({listed}) that form no LoRA layer.")
    kind = kinds[0]
    if kind is LayerKind.LORA:
        if "up" not in roles and "down" not in roles:
            raise LoRAFileError(f"Layer '{name}' has only a bias and no LoRA weights.")
        if "up" not in roles:
            raise LoRAFileError(f"Layer '{name}' has a down/A weight but no up/B weight.")
        if "down" not in roles:
            raise LoRAFileError(f"Layer '{name}' has an up/B weight but no down/A weight.")
    if kind is LayerKind.LOHA and not {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles:
        raise LoRAFileError(f"Layer '{name}' lacks one of the four LoHa matrices.")
    if kind is LayerKind.GLORA and not ROLES[LayerKind.GLORA] <= roles:
        raise LoRAFileError(f"Layer '{name}' lacks one of the four GLoRA matrices.")
    if kind is LayerKind.OFT and {"oft_blocks", "oft_diag"} <= roles:
        raise LoRAFileError(f"Layer '{name}' has both OFT block forms (oft_blocks, oft_diag).")
    if kind is LayerKind.IA3 and "weight" not in roles:
        raise LoRAFileError(f"Layer '{name}' has an (IA)³ on_input flag but no weight.")
    if kind is LayerKind.LOKR and not (
        ({"lokr_w1"} <= roles or {"lokr_w1_a", "lokr_w1_b"} <= roles)
        and ({"lokr_w2"} <= roles or {"lokr_w2_a", "lokr_w2_b"} <= roles)
    ):
        raise LoRAFileError(f"Layer '{name}' lacks one of the two LoKr factors.")
    return kind


def _scalar(name: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise LoRAFileError(f"Layer '{name}' has an alpha that is not a single number.")
    if tensor.device.type == "meta":
        return 1.0  # header-only reading: the value is not known, only that there is one
    value = float(tensor.reshape(()).item())
    if not math.isfinite(value):
        raise LoRAFileError(f"Layer '{name}' has an alpha that is not a finite number.")
    return value


@dataclass(frozen=True)
class _PeftConfig:
    """The part of a component's PEFT ``LoraConfig`` that sets the scale."""

    lora_alpha: float | None
    alpha_pattern: Mapping[str, float]
    use_rslora: bool


def _peft_configs(metadata: Mapping[str, str]) -> dict[str, _PeftConfig]:
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if raw is None:
        return {}
    try:
        flat = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested thousands of levels deep
        raise LoRAFileError(
            f"The file's '{LORA_ADAPTER_METADATA_KEY}' metadata is not valid JSON."
        ) from None
    if not isinstance(flat, dict):
        raise LoRAFileError(f"The file's '{LORA_ADAPTER_METADATA_KEY}' metadata is not an object.")
    configs: dict[str, dict[str, object]] = {}
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        configs.setdefault(component, {})[field] = value
    parsed = {}
    for component, config in configs.items():
        alpha = config.get("lora_alpha")
        pattern = config.get("alpha_pattern") or {}
        if (alpha is not None and not isinstance(alpha, int | float)) or not isinstance(
            pattern, dict
        ):
            raise LoRAFileError(
                f"The file's '{LORA_ADAPTER_METADATA_KEY}' metadata for {component} is not a "
                "valid LoRA configuration."
            )
        parsed[component] = _PeftConfig(
            lora_alpha=float(alpha) if alpha is not None else None,
            alpha_pattern={str(k): float(v) for k, v in pattern.items()},
            use_rslora=bool(config.get("use_rslora", False)),
        )
    return parsed


def _peft_alpha(name: str, rank: int, configs: Mapping[str, _PeftConfig]) -> float | None:
    """PEFT's scale is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), per-module overrides in
    ``alpha_pattern``; returned as the alpha that gives that scale as ``alpha / rank``."""
    component, _, module = name.partition(".")
    config = configs.get(component)
    if config is None:
        return None
    alpha = config.lora_alpha
    for pattern, value in config.alpha_pattern.items():
        if module == pattern or module.endswith(f".{pattern}"):
            alpha = value
    if alpha is None:
        return None
    return alpha * math.sqrt(rank) if config.use_rslora else alpha


def read_layers(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> list[FileLayer]:
    """Group the file's tensors into layers; raise :class:`LoRAFileError` for names or sets of
    tensors no LoRA format has. ``tensors`` may be ``meta`` tensors (shapes only)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    ia3 = {key.removesuffix(".on_input") for key in tensors if key.endswith(".on_input")}
    for key, tensor in tensors.items():
        if key.endswith(".weight") and key.removesuffix(".weight") in ia3:
            split: tuple[str, str] | None = (key.removesuffix(".weight"), "weight")
        else:
            split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        name, role = split
        roles = grouped.setdefault(name, {})
        if role in roles:
            raise LoRAFileError(f"Layer '{name}' has two {role} tensors.")
        roles[role] = tensor
    if unknown:
        shown = ", ".join(f"'{key}'" for key in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise LoRAFileError(
            f"{len(unknown)} of the file's {len(tensors)} tensors are not LoRA weights ({shown})."
        )
    peft = _peft_configs(metadata)
    layers = []
    for name, roles in grouped.items():
        kind = _kind(name, set(roles))
        alpha_tensor = roles.pop("alpha", None)
        alpha = _scalar(name, alpha_tensor) if alpha_tensor is not None else None
        if alpha is None and kind is LayerKind.LORA and "down" in roles:
            alpha = _peft_alpha(name, int(roles["down"].shape[0]), peft)
        dora = _dora(name, roles.pop("dora_scale", None), roles.pop("magnitude", None))
        if dora is not None and kind in WEIGHT_DEPENDENT:
            raise LoRAFileError(f"Layer '{name}' is a DoRA {kind} layer, which is not supported.")
        layers.append(FileLayer(name=name, kind=kind, tensors=roles, alpha=alpha, dora=dora))
    return layers


def _dora(
    name: str, dora_scale: torch.Tensor | None, magnitude: torch.Tensor | None
) -> DoRA | None:
    if dora_scale is not None and magnitude is not None:
        raise LoRAFileError(f"Layer '{name}' has two DoRA magnitudes.")
    if magnitude is not None:
        return DoRA(magnitude, DoRAAxis.OUTPUT, DoRAStrength.INSIDE)
    if dora_scale is None:
        return None
    # LyCORIS/Kohya write (1, in[, 1, 1]) for the usual input-axis decomposition and
    # (out, 1[, 1, 1]) when decomposing on the output axis (LyCORIS ``wd_on_out``).
    axis = DoRAAxis.INPUT if dora_scale.ndim >= 2 and dora_scale.shape[0] == 1 else DoRAAxis.OUTPUT
    return DoRA(dora_scale, axis, DoRAStrength.BLEND)
