"""Classify a LoRA file at upload, from its safetensors header alone (no tensor data read).

:func:`inspect_lora_header` reads the layers with the engine's own key grammar
(:func:`app.cores.lora_files.key_grammar.read_layers`, on ``meta`` tensors of the header's
shapes), so a file accepted here is one the engine reads at generation: the formats and
network types the engine applies are accepted, everything else is refused with a sentence
an end user can act on (full checkpoints, embeddings, unrelated files, variants no
supported path applies, incomplete or inconsistent layers, non-float weights). Whether the
layers fit a particular model is checked at generation, against the loaded model.
"""

from __future__ import annotations

from collections import Counter

import torch

from app.cores.lora_engine.dependent_math import dependent_fit
from app.cores.lora_engine.layer_math import delta_size, layer_rank
from app.cores.lora_files.inspection_types import InvalidLoRAError, LoRAInspection, examples
from app.cores.lora_files.key_grammar import LoRAFileError, read_layers, split_key
from app.cores.lora_files.key_names import (
    FLOAT_DTYPES,
    TORCH_LOADABLE_DTYPES,
    UNSUPPORTED_VARIANTS,
    component_of,
    component_order,
    describe_non_lora,
    key_format,
)
from app.cores.lora_files.layers import WEIGHT_DEPENDENT, FileLayer, LayerKind
from app.cores.lora_files.safetensors_file import SafetensorsHeader

__all__ = ["inspect_lora_header"]

_TYPE_PRIORITY = ("dora", "oft", "glora", "ia3", "lokr", "loha", "full", "locon", "lora")
"""A file's network type is its most specific layer's (LyCORIS files mix kinds)."""


def _check_dtypes(header: SafetensorsHeader) -> None:
    for key, info in header.tensors.items():
        if info.dtype not in TORCH_LOADABLE_DTYPES:
            raise InvalidLoRAError(
                f"Tensor '{key}' uses the {info.dtype} type, which cannot be loaded."
            )
        if not key.endswith((".alpha", ".on_input")) and info.dtype not in FLOAT_DTYPES:
            raise InvalidLoRAError(f"Tensor '{key}' holds {info.dtype} values, not floating point.")


def _check_layer(layer: FileLayer) -> None:
    """Shapes that form a weight difference at all (whether they fit a model is checked at
    generation)."""
    tensors = layer.tensors
    if layer.kind in WEIGHT_DEPENDENT:
        problem = dependent_fit(layer, None)
        if problem is not None:
            raise InvalidLoRAError(f"Layer '{layer.name}' {problem}.")
        return
    if layer.kind is LayerKind.LORA:
        down, up = tensors["down"], tensors["up"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim:
            raise InvalidLoRAError(
                f"Layer '{layer.name}' has weights of shapes {tuple(down.shape)} and "
                f"{tuple(up.shape)}: not a LoRA layer."
            )
        rank = down.shape[0] if "mid" not in tensors else tensors["mid"].shape[1]
        if up.shape[1] != rank:
            raise InvalidLoRAError(
                f"Layer '{layer.name}' is inconsistent: its down/A weight has rank "
                f"{down.shape[0]} but its up/B weight has rank {up.shape[1]}."
            )
        if rank == 0:
            raise InvalidLoRAError(f"Layer '{layer.name}' has rank 0.")
    try:
        rows, _columns = delta_size(layer)
    except (ValueError, IndexError) as error:
        raise InvalidLoRAError(f"Layer '{layer.name}' has inconsistent shapes ({error}).") from None
    bias = tensors.get("bias")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise InvalidLoRAError(f"Layer '{layer.name}' has a bias of shape {tuple(bias.shape)}.")


def _network_type(layer: FileLayer) -> str:
    if layer.dora is not None:
        return "dora"
    if layer.kind in (LayerKind.LOKR, LayerKind.LOHA, LayerKind.FULL, *WEIGHT_DEPENDENT):
        return layer.kind.value
    down = layer.tensors.get("down")
    if "mid" in layer.tensors:
        return "locon"
    if down is not None and down.ndim == 4:
        attention_projection = layer.name.endswith(("proj_in", "proj_out"))
        if tuple(down.shape[2:]) != (1, 1) or not attention_projection:
            return "locon"
    return "lora"


def inspect_lora_header(header: SafetensorsHeader) -> LoRAInspection:
    """Classify a LoRA from its safetensors header alone; raise :class:`InvalidLoRAError` if
    it is not a LoRA the engine applies."""
    if header.invalid_metadata_keys:
        raise InvalidLoRAError(
            "The file's metadata has entries that are not text "
            f"({examples(header.invalid_metadata_keys)}); the safetensors loader refuses such "
            "files."
        )
    keys = list(header.tensors)
    for pattern, message in UNSUPPORTED_VARIANTS:
        if any(pattern.search(key) for key in keys):
            raise InvalidLoRAError(message)
    if not any(split_key(key) is not None for key in keys):
        raise InvalidLoRAError(describe_non_lora(keys))
    meta = {
        key: torch.empty(info.shape, dtype=torch.float32, device="meta")
        for key, info in header.tensors.items()
    }
    try:
        layers = read_layers(meta, header.metadata)
    except LoRAFileError as error:
        raise InvalidLoRAError(str(error)) from None
    _check_dtypes(header)
    components = {layer.name: component_of(layer.name) for layer in layers}
    unplaced = sorted({name.split(".", 1)[0] for name, part in components.items() if part is None})
    if unplaced:
        raise InvalidLoRAError(
            "The LoRA's layer names do not say which part of the model they belong to (they "
            f"start with {examples(part + '.' for part in unplaced)} instead of 'unet.', "
            "'transformer.' or 'text_encoder.')."
        )
    for layer in layers:
        _check_layer(layer)
    ranks = [rank for layer in layers if (rank := layer_rank(layer)) is not None]
    types = {_network_type(layer) for layer in layers if layer.kind is not LayerKind.NORM}
    formats = Counter(key_format(key) for key in keys)
    return LoRAInspection(
        format=formats.most_common(1)[0][0],
        components=tuple(
            sorted({part for part in components.values() if part}, key=component_order)
        ),
        network_type=next((t for t in _TYPE_PRIORITY if t in types), "lora"),
        layer_count=len(layers),
        ranks=tuple(sorted(set(ranks))),
        layer_ranks=tuple(ranks),
    )
