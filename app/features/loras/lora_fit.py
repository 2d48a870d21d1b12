"""The generation-time fit check's building blocks: diffusers' key conversion and shape checks.

:func:`convert_component` mirrors the per-component conversion diffusers applies when loading a
LoRA (``load_lora_adapter`` / ``_load_lora_into_text_encoder``); :func:`shape_problem` compares
each converted LoRA layer with the module of the loaded model it targets, and
:func:`incompatibility_message` turns the problems into one sentence for an end user. Used by
:func:`app.features.loras.lora_inspector.check_lora_fits_pipeline` (and the conversion also by
the upload-time dry run).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.features.loras.lora_types import InvalidLoRAError, examples, first_line

__all__ = [
    "LoRAModule",
    "check_component_metadata",
    "convert_component",
    "group_modules",
    "incompatibility_message",
    "shape_problem",
    "split_components",
]

_CROSS_ATTENTION_MODELS = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}


def split_components(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = value
    return parts


def convert_component(
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
                f"({first_line(error)}); it recognises Kohya text-encoder layers only when "
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


@dataclass
class LoRAModule:
    tensors: dict[str, Any] = field(default_factory=dict)
    """role (``A``, ``B``, ``bias``, ``magnitude``) -> tensor."""


_PEFT_SUFFIXES = {
    "_A.weight": "A",
    "_B.weight": "B",
    "_B.bias": "bias",
    "_magnitude_vector": "magnitude",
}


def group_modules(label: str, state_dict: Mapping[str, Any]) -> dict[str, LoRAModule]:
    modules: dict[str, LoRAModule] = {}
    for key, tensor in state_dict.items():
        module_name, marker, suffix = key.partition(".lora")
        role = _PEFT_SUFFIXES.get(suffix) if marker else None
        if role is None:
            raise InvalidLoRAError(
                f"{label} cannot be used: diffusers would not understand its layer '{key}'."
            )
        modules.setdefault(module_name, LoRAModule()).tensors[role] = tensor
    for module_name, module in modules.items():
        if "A" not in module.tensors or "B" not in module.tensors:
            raise InvalidLoRAError(
                f"{label} cannot be used: layer '{module_name}' lacks its A or B weight."
            )
    return modules


def shape_problem(
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


def check_component_metadata(label: str, component: str, metadata: Mapping[str, Any]) -> None:
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
            f"LoRA configuration ({first_line(error)})."
        ) from None


def incompatibility_message(
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
            f"(e.g. {examples(missing)})."
        )
        sentences.append(text if sentences else f"{label} does not fit the loaded model: {text}")
    return " ".join(sentences)
