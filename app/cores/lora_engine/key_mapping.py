"""Where each layer of a LoRA file lands in the loaded pipeline: one mapping for the fit
check and the application alike.

A file layer's name starts with the part of the model it belongs to (Kohya ``lora_unet_``,
``lora_te1_``; diffusers ``unet.``, ``transformer.``, ``text_encoder_2.``; BFL
``diffusion_model.``; XLabs none), followed by a module name in the trainer's own naming.
Kohya names are module paths with ``.`` written as ``_``, so every name is compared in that
underscored form against an index of the component's modules: that one rule covers Kohya,
LyCORIS, PEFT and old diffusers names on every model whose trainer used diffusers' module
names (SD 1.x/2.x, text encoders, diffusers-named SDXL/SD3/FLUX.1 files). Names of the
original model code (SGM UNet for SDXL, BFL FLUX.1, SAI SD3) go through
:mod:`~app.cores.lora_engine.original_names`.

diffusers' own converters are not used here: they handle plain LoRA keys only (they fail on
LoHa/LoKr/full layers), bake alphas into the weights, and run per file over the whole state
dict, while the engine needs the target of every layer of every format.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from app.cores.lora_engine.original_names import (
    OriginalName,
    SgmLayout,
    flux_name,
    sd3_name,
    sgm_layout,
    sgm_name,
)
from app.cores.lora_files.layers import Target

__all__ = ["COMPONENTS", "KeyMapper", "component_label"]

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline components a LoRA can change."""

_DENOISER_PREFIXES = (
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
    "unet.",
    "transformer.",
    "model.diffusion_model.",
    "diffusion_model.",
)
_TEXT_PREFIXES = (
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder_3.", "text_encoder_3"),
    ("text_encoder.", "text_encoder"),
)
_KOHYA_TEXT = {"te1": "text_encoder", "te2": "text_encoder_2"}


def component_label(component: str) -> str:
    """How a user calls a component: the UNet/transformer or a text encoder."""
    if component.startswith("text_encoder"):
        number = component.removeprefix("text_encoder").lstrip("_") or "1"
        return f"text encoder {number}"
    return component


@dataclass(frozen=True)
class _Component:
    name: str
    modules: dict[str, torch.nn.Module]
    """Dotted module name -> module, for every module with a weight."""
    underscored: dict[str, str]
    """Underscored name -> dotted name (ambiguous names left out)."""


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _index(name: str, component: torch.nn.Module) -> _Component:
    modules: dict[str, torch.nn.Module] = {}
    underscored: dict[str, str] = {}
    ambiguous: set[str] = set()
    for module_name, module in component.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        modules[module_name] = module
        key = module_name.replace(".", "_")
        if key in underscored:
            ambiguous.add(key)
        underscored[key] = module_name
    for key in ambiguous:
        del underscored[key]
    return _Component(name, modules, underscored)


class KeyMapper:
    """Maps file layer names onto the modules of one loaded pipeline."""

    def __init__(self, pipeline: Any) -> None:
        self._components = {
            name: module
            for name in COMPONENTS
            if isinstance(module := getattr(pipeline, name, None), torch.nn.Module)
        }

    @cached_property
    def _indexes(self) -> dict[str, _Component]:
        return {name: _index(name, module) for name, module in self._components.items()}

    @cached_property
    def _sgm_layout(self) -> SgmLayout:
        return sgm_layout(self._components["unet"])

    @property
    def denoiser(self) -> str:
        return "unet" if "unet" in self._components else "transformer"

    def _t5(self) -> str | None:
        for name in ("text_encoder_3", "text_encoder_2"):
            if type(self._components.get(name)).__name__.startswith("T5"):
                return name
        return None

    def split_prefix(self, name: str) -> tuple[str | None, str]:
        """(component, rest of the name underscored); component None when the prefix names a
        part the loaded model does not have."""
        for prefix in _DENOISER_PREFIXES:
            if name.startswith(prefix):
                return self.denoiser, name[len(prefix) :].replace(".", "_")
        for prefix, part in _TEXT_PREFIXES:
            if name.startswith(prefix):
                component = self._t5() if part == "te3" else _KOHYA_TEXT.get(part, part)
                rest = name[len(prefix) :].replace(".", "_")
                return (component if component in self._components else None), rest
        return self.denoiser, name.replace(".", "_")  # XLabs: no prefix

    def targets(self, name: str) -> list[Target] | None:
        """The modules a file layer changes, or None when the loaded model has none of them."""
        component, rest = self.split_prefix(name)
        if component is None:
            return None
        index = self._indexes[component]
        found = self._diffusers_name(index, rest)
        if found is not None:
            return [Target(component, found)]
        if component == "unet":
            sgm = sgm_name(rest, self._sgm_layout)
            found = index.underscored.get(sgm) if sgm is not None else None
            return [Target(component, found)] if found is not None else None
        original = self._original(rest) if component == "transformer" else None
        return self._split(index, original) if original is not None else None

    def uses_original_name(self, name: str) -> bool:
        """Whether the layer is named after the original model code (SGM, BFL, SAI, XLabs)."""
        component, rest = self.split_prefix(name)
        return (
            component is not None and self._diffusers_name(self._indexes[component], rest) is None
        )

    def module(self, target: Target) -> torch.nn.Module:
        return self._indexes[target.component].modules[target.module]

    def weight(self, target: Target) -> torch.Tensor:
        return _weight(self.module(target))

    def _diffusers_name(self, index: _Component, rest: str) -> str | None:
        found = index.underscored.get(rest)
        if found is None and index.name.startswith("text_encoder"):
            # transformers 5's CLIP text models have no ``text_model`` level; files have it.
            found = index.underscored.get(rest.removeprefix("text_model_"))
        return found

    def _original(self, rest: str) -> OriginalName | None:
        transformer = self._components["transformer"]
        kind = type(transformer).__name__
        if kind == "FluxTransformer2DModel":
            return flux_name(rest)
        if kind == "SD3Transformer2DModel":
            return sd3_name(rest, len(getattr(transformer, "transformer_blocks", [])) - 1)
        return None

    def _split(self, index: _Component, original: OriginalName) -> list[Target] | None:
        modules = [index.modules.get(name) for name in original.modules]
        if any(module is None for module in modules):
            return None
        if original.swap_halves:
            (name,) = original.modules
            rows = int(_weight(index.modules[name]).shape[0])
            half = rows // 2
            first, second = slice(0, half), slice(half, rows)
            return [
                Target(index.name, name, rows=first, into=second),
                Target(index.name, name, rows=second, into=first),
            ]
        if len(original.modules) == 1:
            return [Target(index.name, original.modules[0])]
        targets, start = [], 0
        for name in original.modules:
            rows = int(_weight(index.modules[name]).shape[0])
            targets.append(Target(index.name, name, rows=slice(start, start + rows)))
            start += rows
        return targets
