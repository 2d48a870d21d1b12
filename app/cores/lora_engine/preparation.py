"""Read a LoRA file once and check every layer against the loaded model.

The result, :class:`PreparedLoRA`, is each file layer with the modules it changes; it is what
the cache keeps and what fusion applies. Preparing refuses, with one sentence a user can act
on, a file whose layers the model does not have or whose sizes do not fit: applying part of a
LoRA would give a different image than every other tool, silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from app.cores.lora_engine.dependent_math import dependent_fit
from app.cores.lora_engine.errors import LoRAIncompatibleError
from app.cores.lora_engine.key_mapping import KeyMapper
from app.cores.lora_engine.layer_math import delta_size
from app.cores.lora_engine.request import LoRARequest
from app.cores.lora_files.key_grammar import LoRAFileError, read_layers
from app.cores.lora_files.layers import WEIGHT_DEPENDENT, FileLayer, LayerKind, Target

__all__ = ["PreparedLayer", "PreparedLoRA", "prepare"]

_CROSS_ATTENTION_MODELS = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}
_EXAMPLES = 3


@dataclass(frozen=True)
class PreparedLayer:
    layer: FileLayer
    targets: tuple[Target, ...]
    shape: tuple[int, ...]
    """The shape of the whole weight difference (rows of every target, the module's other
    dimensions)."""


@dataclass(frozen=True)
class PreparedLoRA:
    key: str
    layers: tuple[PreparedLayer, ...]
    diffusers_loads_it: bool
    """Only plain LoRA layers, in diffusers' module names, each shaped like its module's
    weight, with one alpha for all: what ``load_lora_weights`` applies the same way (Plan
    006's path). Original model names (SGM, BFL, SAI, XLabs), LyCORIS kinds, DoRA, reshaped
    layers and per-layer alphas are the engine's."""

    @property
    def nbytes(self) -> int:
        return sum(prepared.layer.nbytes for prepared in self.layers)


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(f"'{name}'" for name in names[:_EXAMPLES])
    return shown + (", ..." if len(names) > _EXAMPLES else "")


def _read(request: LoRARequest, pin_memory: bool) -> list[FileLayer]:
    label = f"LoRA '{request.name}'"
    try:
        with safe_open(str(request.path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            # A copy: get_tensor maps the file; a cached tensor must own its memory, or a file
            # truncated later (replaced, disk cleaned) kills the process with SIGBUS.
            tensors = {
                key: _owned(handle.get_tensor(key), pin_memory)
                for key in handle.keys()  # noqa: SIM118
            }
        layers = read_layers(tensors, metadata)
    except FileNotFoundError:
        raise LoRAIncompatibleError(f"{label} cannot be used: its file is missing.") from None
    except (OSError, LoRAFileError, ValueError, SafetensorError) as error:
        raise LoRAIncompatibleError(f"{label} cannot be used: {error}") from None
    if not layers:
        raise LoRAIncompatibleError(f"{label} cannot be used: it contains no LoRA layers.")
    return layers


def _owned(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    return tensor.pin_memory() if pin_memory else tensor.clone()


def _has_weight_part(layer: FileLayer) -> bool:
    return not (
        (layer.kind is LayerKind.FULL and "diff" not in layer.tensors)
        or (layer.kind is LayerKind.NORM and "w_norm" not in layer.tensors)
    )


def _mismatch(name: str, actual: tuple[int, int], expected: tuple[int, int]) -> str:
    return (
        f"layer {name} changes a {actual[0]}x{actual[1]} weight; the loaded model's is "
        f"{expected[0]}x{expected[1]}"
    )


def prepare(request: LoRARequest, mapper: KeyMapper, *, pin_memory: bool) -> PreparedLoRA:
    """Read ``request``'s file into host memory and map every layer onto the model; raise
    :class:`LoRAIncompatibleError` when any layer does not fit.

    The factors stay in host memory (pinned for a GPU model, so that each layer's copy to the
    GPU during fusion runs at full bus speed and asynchronously): cached LoRAs cost no GPU
    memory, and applying five adds only one layer's factors to the GPU's peak."""
    layers = _read(request, pin_memory)
    prepared: list[PreparedLayer] = []
    missing: list[str] = []
    mismatched: list[str] = []
    cross: list[tuple[int, int]] = []
    plain = True
    for layer in layers:
        targets = mapper.targets(layer.name)
        if targets is None:
            missing.append(layer.name)
            continue
        first = mapper.weight(targets[0])
        trailing = tuple(first.shape[1:])
        columns = 1
        for size in trailing:
            columns *= int(size)
        if len(targets) > 1 and targets[0].into is None:
            rows = sum(int(mapper.weight(t).shape[0]) for t in targets)
        else:
            rows = int(first.shape[0])
        plain = plain and (
            len(targets) == 1
            and not mapper.uses_original_name(layer.name)
            and layer.kind is LayerKind.LORA
            and "mid" not in layer.tensors
            and layer.dora is None
            and layer.tensors["down"].ndim == first.ndim
        )
        if layer.kind in WEIGHT_DEPENDENT:
            if len(targets) > 1:
                mismatched.append(
                    f"layer {layer.name} is a {layer.kind} layer on a fused projection"
                )
                continue
            problem = dependent_fit(layer, (rows, *trailing))
            if problem is not None:
                mismatched.append(f"layer {layer.name} {problem}")
                continue
            prepared.append(PreparedLayer(layer, tuple(targets), (rows, *trailing)))
            continue
        actual = delta_size(layer)
        if not _has_weight_part(layer):  # only a bias difference: its length is all to check
            columns = 1
        if actual != (rows, columns):
            mismatched.append(_mismatch(layer.name, actual, (rows, columns)))
            if layer.name.endswith(("attn2_to_k", "attn2_to_v", "attn2.to_k", "attn2.to_v")):
                cross.append((actual[1], columns))
            continue
        if layer.dora is not None and len(targets) > 1:
            mismatched.append(f"layer {layer.name} is a DoRA layer on a fused projection")
            continue
        prepared.append(PreparedLayer(layer, tuple(targets), (rows, *trailing)))
    if missing or mismatched:
        raise LoRAIncompatibleError(
            _incompatibility(request.name, len(layers), missing, mismatched, cross)
        )
    # diffusers applies one alpha (the most common) to every layer of a Kohya file.
    alphas = {p.layer.alpha for p in prepared}
    return PreparedLoRA(request.content_key, tuple(prepared), plain and len(alphas) <= 1)


def _incompatibility(
    name: str,
    total: int,
    missing: list[str],
    mismatched: list[str],
    cross_attention: list[tuple[int, int]],
) -> str:
    label = f"LoRA '{name}'"
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
