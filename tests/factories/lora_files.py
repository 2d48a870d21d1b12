"""Write real LoRA files (and realistic bad ones) for tests.

:func:`write_lora` reads a pipeline's own module names and shapes (``pipeline.unet``,
``pipeline.text_encoder``) and writes a LoRA for them in one of the key formats diffusers
loads. Weights come from a seeded ``torch.Generator``: the same arguments write the same bytes,
and the draws do not depend on the format, so one LoRA written as Kohya and as PEFT (alpha =
rank) holds the same weights. The default size visibly changes a 64x64 image of the tiny
embedded model and keeps it finite.

Layers chosen by default: UNet attention ``to_q``/``to_k``/``to_v``/``to_out.0``; text-encoder
``q_proj``/``k_proj``/``v_proj``/``out_proj``. ``include_conv=True`` adds the 1x1 attention
``proj_in``/``proj_out`` and the 3x3 resnet ``conv1``/``conv2`` (a LoCon).

Formats:

* ``"kohya"``: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``; text encoder ``lora_te_text_model_encoder_layers_0_self_attn_q_proj...``.
* ``"peft"``: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``; text encoder
  ``text_encoder.text_model.<module>...`` (``text_model_prefix=False`` leaves it out). An alpha
  other than the rank is written as diffusers' ``lora_adapter_metadata``.
* ``"diffusers_legacy"``: ``unet.<block>.attn1.processor.to_q_lora.down.weight`` for attention
  projections, ``unet.<module>.lora.down.weight`` otherwise; text encoder
  ``text_encoder.text_model.<block>.self_attn.to_q_lora.down.weight`` and
  ``...mlp.fc1.lora_linear_layer.down.weight``. Alpha is always the rank.

The bad-file writers (what users really upload by mistake) are in ``bad_lora_files`` and
re-exported here.

LoRAs shaped for real model families (SD 1.x/2.x, SDXL, SD3, FLUX.1; realistic key names and
widths, rank 1, a few layers) for base-model detection are in ``family_loras``:
:func:`write_family_lora` is re-exported here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from tests.factories.bad_lora_files import (
    UNKNOWN_MODULES,
    write_down_without_up,
    write_empty,
    write_full_checkpoint_like,
    write_header_bomb,
    write_pickle_renamed,
    write_raw_header,
    write_truncated,
    write_truncated_header,
    write_unknown_modules,
    write_unrelated_tensors,
    write_wrong_shapes,
)
from tests.factories.family_loras import write_family_lora as write_family_lora

__all__ = [
    "TEXT_ENCODER_ATTENTION_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "UNET_CONV_TARGETS",
    "UNKNOWN_MODULES",
    "LoRAFileFormat",
    "LoRATarget",
    "lora_targets",
    "random_lora_weights",
    "write_down_without_up",
    "write_empty",
    "write_family_lora",
    "write_full_checkpoint_like",
    "write_header_bomb",
    "write_lora",
    "write_pickle_renamed",
    "write_raw_header",
    "write_truncated",
    "write_truncated_header",
    "write_unknown_modules",
    "write_unrelated_tensors",
    "write_wrong_shapes",
]

LoRAFileFormat = Literal["kohya", "peft", "diffusers_legacy"]

UNET_ATTENTION_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_ATTENTION_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_CONV_TARGETS: tuple[str, ...] = ("proj_in", "proj_out", "conv1", "conv2")

_TEXT_COMPONENTS = {"text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
_LEGACY_UNET_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
_LEGACY_TEXT_PROJECTIONS = {
    "q_proj": "to_q",
    "k_proj": "to_k",
    "v_proj": "to_v",
    "out_proj": "to_out",
}


@dataclass(frozen=True)
class LoRATarget:
    """One layer of a pipeline component that a LoRA can target."""

    component: str
    name: str
    """Module name inside the component, as ``named_modules()`` gives it."""
    module: torch.nn.Module

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, torch.nn.Conv2d)

    @property
    def in_features(self) -> int:
        module = self.module
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
        assert isinstance(module, torch.nn.Linear)
        return module.in_features

    @property
    def out_features(self) -> int:
        module = self.module
        if isinstance(module, torch.nn.Conv2d):
            return module.out_channels
        assert isinstance(module, torch.nn.Linear)
        return module.out_features

    @property
    def kernel(self) -> tuple[int, int]:
        assert isinstance(self.module, torch.nn.Conv2d)
        kh, kw = self.module.kernel_size
        return (kh, kw)


def lora_targets(
    pipeline: Any,
    components: Sequence[str] = ("unet",),
    *,
    targets: Sequence[str] | None = None,
    include_conv: bool = False,
) -> list[LoRATarget]:
    """The Linear / Conv2d layers of ``pipeline`` a LoRA written by :func:`write_lora` targets.

    ``targets`` are module-name endings (``"to_q"``, ``"attn2.to_k"``, ``"q_proj"``, ...); by
    default the attention projections of each component.
    """
    found: list[LoRATarget] = []
    for component in components:
        model = getattr(pipeline, component)
        if targets is not None:
            endings = tuple(targets)
        elif component == "unet":
            endings = UNET_ATTENTION_TARGETS + (UNET_CONV_TARGETS if include_conv else ())
        else:
            endings = TEXT_ENCODER_ATTENTION_TARGETS
        for name, found_module in model.named_modules():
            if ".base_layer" in name or ".lora_" in name:
                continue  # inside a layer wrapped by an adapter already loaded
            module = found_module
            if hasattr(module, "get_base_layer"):
                module = module.get_base_layer()
            if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                continue
            if name == "" or not (
                name in endings or name.endswith(tuple(f".{e}" for e in endings))
            ):
                continue
            found.append(LoRATarget(component, name, module))
    if not found:
        raise ValueError(f"no LoRA targets in {components} for {targets}")
    return found


def random_lora_weights(
    targets: Sequence[LoRATarget], *, rank: int, seed: int, scale: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(down/A, up/B) per target, seeded. ``B @ A`` has entries of about ``scale / sqrt(in)``,
    the size of the layer's own initial weights when ``scale`` is 1."""
    generator = torch.Generator().manual_seed(seed)
    weights = []
    for target in targets:
        fan_in = target.in_features * (math.prod(target.kernel) if target.is_conv else 1)
        down_shape: tuple[int, ...] = (rank, target.in_features)
        up_shape: tuple[int, ...] = (target.out_features, rank)
        if target.is_conv:
            down_shape += target.kernel
            up_shape += (1, 1)
        down = torch.randn(down_shape, generator=generator) / math.sqrt(fan_in)
        up = torch.randn(up_shape, generator=generator) * (scale / math.sqrt(rank))
        weights.append((down.contiguous(), up.contiguous()))
    return weights


def _kohya_name(target: LoRATarget) -> str:
    if target.component == "unet":
        return "lora_unet_" + target.name.replace(".", "_")
    prefix = _TEXT_COMPONENTS[target.component]
    name = target.name if target.name.startswith("text_model.") else f"text_model.{target.name}"
    return f"{prefix}_" + name.replace(".", "_")


def _text_model_name(target: LoRATarget, text_model_prefix: bool) -> str:
    name = target.name.removeprefix("text_model.")
    return f"text_model.{name}" if text_model_prefix else name


def _legacy_keys(target: LoRATarget) -> tuple[str, str]:
    if target.component == "unet":
        parent, _, projection = target.name.rpartition(".")
        if target.name.endswith(".to_out.0"):
            parent, projection = target.name.removesuffix(".to_out.0"), "to_out.0"
        legacy = _LEGACY_UNET_PROJECTIONS.get(projection)
        if legacy is not None and parent.rsplit(".", 1)[-1] in ("attn1", "attn2"):
            stem = f"unet.{parent}.processor.{legacy}_lora"
        else:
            stem = f"unet.{target.name}.lora"
    else:
        name = _text_model_name(target, True)
        parent, _, projection = name.rpartition(".")
        legacy = _LEGACY_TEXT_PROJECTIONS.get(projection)
        if legacy is not None:
            stem = f"{target.component}.{parent}.{legacy}_lora"
        else:
            stem = f"{target.component}.{name}.lora_linear_layer"
    return f"{stem}.down.weight", f"{stem}.up.weight"


def write_lora(
    path: Path,
    pipeline: Any,
    *,
    fmt: LoRAFileFormat = "kohya",
    components: Sequence[str] = ("unet",),
    rank: int = 4,
    seed: int = 0,
    alpha: float | None = None,
    scale: float = 1.0,
    targets: Sequence[str] | None = None,
    include_conv: bool = False,
    dora: bool = False,
    text_model_prefix: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a real LoRA for ``pipeline``'s layers to ``path`` and return ``path``.

    ``alpha`` defaults to ``rank`` (scale 1). ``dora=True`` adds DoRA magnitudes: PEFT
    ``lora_magnitude_vector`` (which diffusers applies) or Kohya ``dora_scale`` (which diffusers
    drops); not for the legacy format.
    """
    chosen = lora_targets(pipeline, components, targets=targets, include_conv=include_conv)
    weights = random_lora_weights(chosen, rank=rank, seed=seed, scale=scale)
    effective_alpha = float(rank if alpha is None else alpha)
    tensors: dict[str, torch.Tensor] = {}
    file_metadata: dict[str, str] = {"format": "pt"}
    adapter_metadata: dict[str, Any] = {}
    for target, (down, up) in zip(chosen, weights, strict=True):
        magnitude = _magnitude(target, down, up, effective_alpha / rank) if dora else None
        if fmt == "kohya":
            stem = _kohya_name(target)
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(effective_alpha)
            if magnitude is not None:
                tensors[f"{stem}.dora_scale"] = magnitude.reshape(-1, 1).contiguous()
        elif fmt == "peft":
            name = (
                target.name
                if target.component == "unet"
                else _text_model_name(target, text_model_prefix)
            )
            stem = f"{target.component}.{name}"
            tensors[f"{stem}.lora_A.weight"] = down
            tensors[f"{stem}.lora_B.weight"] = up
            if magnitude is not None:
                shape = (1, -1, 1, 1) if target.is_conv else (-1,)
                tensors[f"{stem}.lora_magnitude_vector"] = magnitude.reshape(shape).contiguous()
            config = adapter_metadata.setdefault(
                target.component,
                {"r": rank, "lora_alpha": effective_alpha, "target_modules": [], "use_dora": dora},
            )
            config["target_modules"].append(target.name)
        else:
            if (alpha is not None and alpha != rank) or dora:
                raise ValueError("the legacy format has no alpha and no DoRA")
            down_key, up_key = _legacy_keys(target)
            tensors[down_key] = down
            tensors[up_key] = up
    if fmt == "peft" and effective_alpha != rank:
        packed = {
            f"{component}.{key}": value
            for component, config in adapter_metadata.items()
            for key, value in config.items()
        }
        file_metadata["lora_adapter_metadata"] = json.dumps(packed, sort_keys=True)
    file_metadata.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=file_metadata)
    return path


def _magnitude(
    target: LoRATarget, down: torch.Tensor, up: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Per-output-channel norms of the adapted weight, slightly changed: a plausible DoRA."""
    base = target.module.weight
    assert isinstance(base, torch.Tensor)
    weight = base.detach().reshape(target.out_features, -1)
    delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * scaling
    magnitude: torch.Tensor = (weight + delta).norm(dim=1) * 1.1
    return magnitude
