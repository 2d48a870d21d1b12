"""The fast LoRA path: harvest once, fuse per request, restore exactly.

Loading a LoRA through diffusers costs ~100 ms per file on the tiny model, almost all of it
PEFT walking the modules and injecting layers, and unfused adapters slow every denoising
step. So each LoRA goes through diffusers only once per loaded model: it is loaded as a
normal adapter, its per-layer ``A``, ``B`` and ``scaling`` are copied out ("harvested"),
and the adapter is removed again. Those tensors are exactly what PEFT would apply, so the
semantics (Kohya alphas, PEFT metadata, text-encoder names) stay diffusers' own.

A request then fuses its weighted set straight into the weights the LoRAs touch,
``W += sum(w_i * s_i * B_i @ A_i)``, after saving a copy of only those tensors, and the
copies are put back by ``copy_`` afterwards: the base weights are bit-identical after every
generation, and the denoising loop runs at the base model's speed.

Everything here runs with the pipeline lock held, except ``HarvestCache.discard``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_HARVEST_ADAPTER = "harvest"


class FusionUnsupportedError(Exception):
    """The LoRA uses a feature the fast path does not fuse (e.g. DoRA)."""


@dataclass(frozen=True)
class LayerFactors:
    """One layer of one LoRA: delta = scale * B @ A (for convolutions, as PEFT composes it)."""

    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    scale: float
    bias: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        extra = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.down.numel() * self.down.element_size() + (
            self.up.numel() * self.up.element_size() + extra
        )


@dataclass(frozen=True)
class HarvestedLoRA:
    """A LoRA's factors for one loaded model, keyed by (component, module name)."""

    key: str
    layers: dict[tuple[str, str], LayerFactors]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())


def lora_components(pipeline: Any) -> dict[str, torch.nn.Module]:
    names = getattr(type(pipeline), "_lora_loadable_modules", ["unet", "text_encoder"])
    found = {}
    for name in names:
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            found[name] = module
    return found


@dataclass(frozen=True)
class HarvestRequest:
    path: str
    key: str
    display_name: str


def harvest(pipeline: Any, requests: Sequence[HarvestRequest]) -> list[HarvestedLoRA]:
    """Load the LoRAs through diffusers, copy their factors out, and remove them again.

    All of them are loaded first and read in one walk over the modules, then removed with one
    ``unload_lora_weights``: the module walks and the unload are the expensive part.
    """
    from peft.tuners.lora import LoraLayer

    names = {f"{_HARVEST_ADAPTER}_{index}": request for index, request in enumerate(requests)}
    layers: dict[str, dict[tuple[str, str], LayerFactors]] = {name: {} for name in names}
    try:
        for name, request in names.items():
            # use_safetensors: never fall back to diffusers' pickle loader.
            pipeline.load_lora_weights(request.path, adapter_name=name, use_safetensors=True)
        for component_name, component in lora_components(pipeline).items():
            for module_name, found in component.named_modules():
                if not isinstance(found, LoraLayer):
                    continue
                module: Any = found  # peft's layer attributes are untyped
                for name in names.keys() & module.lora_A.keys():
                    if module.use_dora.get(name, False):
                        raise FusionUnsupportedError(f"'{names[name].display_name}' has DoRA")
                    bias = module.lora_B[name].bias
                    layers[name][(component_name, module_name)] = LayerFactors(
                        down=module.lora_A[name].weight.detach().clone(),
                        up=module.lora_B[name].weight.detach().clone(),
                        scale=float(module.scaling[name]),
                        bias=bias.detach().clone() if bias is not None else None,
                    )
    finally:
        pipeline.unload_lora_weights()
    return [HarvestedLoRA(key=request.key, layers=layers[name]) for name, request in names.items()]


def _delta(weight: torch.Tensor, factors: Sequence[tuple[LayerFactors, float]]) -> torch.Tensor:
    """sum(w * s * B @ A) in the weight's shape, computed in float32 for accuracy."""
    first = factors[0][0]
    if first.down.dim() == 2 or tuple(first.down.shape[2:]) == (1, 1):
        # Stack ranks: one matmul for the whole set, [B1 .. Bn] @ [w1 s1 A1; ..; wn sn An].
        ups = torch.cat([layer.up.flatten(1).to(torch.float32) for layer, _ in factors], dim=1)
        downs = torch.cat(
            [layer.down.flatten(1).to(torch.float32) * (w * layer.scale) for layer, w in factors]
        )
        return (ups @ downs).view(weight.shape)
    total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for layer, w in factors:  # k x k convolutions: compose the two kernels as PEFT does
        down = layer.down.to(torch.float32).permute(1, 0, 2, 3)
        composed = F.conv2d(down, layer.up.to(torch.float32)).permute(1, 0, 2, 3)
        total += composed * (w * layer.scale)
    return total


class ComponentWeights(Protocol):
    def weight_for(self, component: str) -> float: ...


@contextlib.contextmanager
def fused(
    pipeline: Any, selection: Sequence[tuple[HarvestedLoRA, ComponentWeights]]
) -> Iterator[int]:
    """Fuse the weighted LoRAs into the model; restore the touched tensors on exit.

    Yields the number of tensors changed. The restore runs whatever happens inside.
    """
    components = lora_components(pipeline)
    per_layer: dict[tuple[str, str], list[tuple[LayerFactors, float]]] = {}
    for lora, weights in selection:
        for (component_name, module_name), layer in lora.layers.items():
            layer_weight = weights.weight_for(component_name)
            if layer_weight != 0:
                key = (component_name, module_name)
                per_layer.setdefault(key, []).append((layer, layer_weight))
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for (component_name, module_name), factors in per_layer.items():
                module: Any = components[component_name].get_submodule(module_name)
                weight: torch.Tensor = module.weight
                saved.append((weight, weight.detach().clone()))
                weight.add_(_delta(weight, factors).to(weight.dtype))
                biases = [(f.bias, w * f.scale) for f, w in factors if f.bias is not None]
                if biases:
                    module_bias: torch.Tensor = module.bias
                    saved.append((module_bias, module_bias.detach().clone()))
                    for bias, scale in biases:
                        module_bias.add_((bias.to(torch.float32) * scale).to(module_bias.dtype))
        yield len(saved)
    finally:
        with torch.no_grad():
            for tensor, original in saved:
                tensor.copy_(original)


class HarvestCache:
    """Harvested LoRAs kept for the loaded model, least recently used evicted first.

    Bounded by count and bytes. ``discard`` may be called from any thread (a LoRA being
    deleted); a generation that already holds the tensors keeps them until it ends.
    """

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, HarvestedLoRA] = OrderedDict()
        self._guard = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_count > 0

    def get(self, key: str) -> HarvestedLoRA | None:
        with self._guard:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def contains(self, key: str) -> bool:
        """Membership without touching the recency order."""
        with self._guard:
            return key in self._entries

    def put(self, entry: HarvestedLoRA, keep: set[str]) -> None:
        """Add ``entry``; evict least recently used entries not in ``keep`` to fit."""
        with self._guard:
            self._entries[entry.key] = entry
            self._entries.move_to_end(entry.key)
            for key in list(self._entries):
                if len(self._entries) <= self.max_count and self.nbytes <= self.max_bytes:
                    break
                if key not in keep and key != entry.key:
                    logger.info("Evicting cached LoRA %s", key)
                    del self._entries[key]

    def discard(self, key: str) -> None:
        with self._guard:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._guard:
            self._entries.clear()

    def keys(self) -> list[str]:
        with self._guard:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())
