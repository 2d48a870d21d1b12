"""Fuse prepared LoRAs into the model's weights for one generation; restore them exactly.

Each touched weight is copied first (into reused host buffers: ``backups``); the weighted
differences of every LoRA on it are summed in float32 on the weight's device and added once,
so the denoising loop runs at the base model's speed; afterwards the copies are put back
with ``copy_``: the base weights are bit-identical after every generation
(``fuse_lora``/``unfuse_lora`` are not: subtracting again leaves rounding errors). DoRA
layers and the weight-dependent kinds ((IA)³, GLoRA, OFT) are not additive: they change the
summed weight, one after the other, in the order the request lists them (as A1111 and
ComfyUI apply them).

Runs with the pipeline lock held.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from app.cores.lora_engine.backups import BackupPool
from app.cores.lora_engine.dependent_math import dependent_weight
from app.cores.lora_engine.key_mapping import KeyMapper
from app.cores.lora_engine.layer_math import bias_delta, layer_scale, weight_delta
from app.cores.lora_engine.preparation import PreparedLayer, PreparedLoRA
from app.cores.lora_engine.request import LoRARequest
from app.cores.lora_files.layers import WEIGHT_DEPENDENT, LayerKind, Target

logger = logging.getLogger(__name__)

_Contribution = tuple[PreparedLayer, Target, float]


def _rows_of(prepared: PreparedLayer, target: Target, device: torch.device) -> torch.Tensor | None:
    """The target's rows of the layer's weight difference (float32)."""
    layer, rows = prepared.layer, target.rows
    if rows is None:
        return weight_delta(layer, prepared.shape, device)
    if layer.kind is LayerKind.LORA:
        # A row slice of up @ down is up[rows] @ down: no need to build the fused delta.
        tensors = dict(layer.tensors)
        tensors["up"] = tensors["up"][rows]
        if "bias" in tensors:
            tensors["bias"] = tensors["bias"][rows]
        shape = (rows.stop - rows.start, *prepared.shape[1:])
        return weight_delta(replace(layer, tensors=tensors), shape, device)
    whole = weight_delta(layer, prepared.shape, device)
    return whole[rows] if whole is not None else None


def _bias_rows(
    prepared: PreparedLayer, target: Target, device: torch.device
) -> torch.Tensor | None:
    delta = bias_delta(prepared.layer, device)
    if delta is None or target.rows is None:
        return delta
    return delta[target.rows]


def _is_plain(prepared: PreparedLayer, target: Target) -> bool:
    """A plain LoRA layer landing on whole rows in place: ``up @ down`` stacks with others."""
    layer = prepared.layer
    return (
        layer.kind is LayerKind.LORA
        and "mid" not in layer.tensors
        and layer.dora is None
        and target.into is None
    )


def _depends_on_weight(prepared: PreparedLayer) -> bool:
    return prepared.layer.dora is not None or prepared.layer.kind in WEIGHT_DEPENDENT


def _stacked_factors(
    plain: Sequence[_Contribution], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(w * s * up @ down)`` of plain LoRA layers is one matmul of the stacked factors,
    ``[up_1 .. up_n] @ [w_1 s_1 down_1; ..; w_n s_n down_n]``, in float32: one pass over the
    weight instead of one per LoRA (rows x columns, flattened)."""
    ups, downs = [], []
    for prepared, target, strength in plain:
        up = prepared.layer.tensors["up"]
        if target.rows is not None:
            up = up[target.rows]
        ups.append(up.flatten(1).to(device, torch.float32))
        scale = strength * layer_scale(prepared.layer)
        downs.append(prepared.layer.tensors["down"].flatten(1).to(device, torch.float32) * scale)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _fuse_module(
    module: torch.nn.Module, contributions: Sequence[_Contribution], backups: BackupPool
) -> None:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    device = weight.device
    backups.save(weight)
    plain = [c for c in contributions if _is_plain(c[0], c[1])]
    others = [c for c in contributions if not _is_plain(c[0], c[1])]
    dependent = [(p, w) for p, _target, w in others if _depends_on_weight(p)]
    additive = [c for c in others if not _depends_on_weight(c[0])]
    in_place = weight.ndim > 1 and weight.is_contiguous() and weight.dtype == torch.float32
    flat = weight.view(weight.shape[0], -1) if in_place else None
    if plain and not additive and not dependent and flat is not None:
        flat.addmm_(*_stacked_factors(plain, device))  # the common case: no buffer at all
    else:
        total = torch.zeros(weight.shape, dtype=torch.float32, device=device)
        if plain:
            ups, downs = _stacked_factors(plain, device)
            total += (ups @ downs).view(weight.shape)
        for prepared, target, strength in additive:
            into = target.into if target.into is not None else slice(None)
            delta = _rows_of(prepared, target, device)
            if delta is not None:
                total[into] += strength * delta.reshape(total[into].shape)
        if dependent:
            current = weight.to(torch.float32) + total
            for prepared, strength in dependent:
                current = dependent_weight(prepared.layer, current, strength)
            weight.copy_(current.to(weight.dtype))
        else:
            weight.add_(total.to(weight.dtype))
    _fuse_bias(module, contributions, backups)


def _fuse_bias(
    module: torch.nn.Module, contributions: Sequence[_Contribution], backups: BackupPool
) -> None:
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor):
        return
    total: torch.Tensor | None = None
    for prepared, target, strength in contributions:
        delta = _bias_rows(prepared, target, bias.device)
        if delta is None:
            continue
        if total is None:
            total = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        into = target.into if target.into is not None else slice(None)
        total[into] += strength * delta
    if total is not None:
        backups.save(bias)
        bias.add_(total.to(bias.dtype))


@contextlib.contextmanager
def fused(
    mapper: KeyMapper,
    selection: Sequence[tuple[PreparedLoRA, LoRARequest]],
    backups: BackupPool,
) -> Iterator[int]:
    """Fuse the weighted LoRAs; restore every touched tensor on exit, whatever happens inside.
    Yields the number of tensors changed."""
    per_module: dict[tuple[str, str], list[_Contribution]] = {}
    for prepared, request in selection:
        for layer in prepared.layers:
            for target in layer.targets:
                strength = request.weight_for(target.component)
                if strength != 0:
                    key = (target.component, target.module)
                    per_module.setdefault(key, []).append((layer, target, strength))
    try:
        with torch.no_grad():
            for (component, module), contributions in per_module.items():
                _fuse_module(mapper.module(Target(component, module)), contributions, backups)
        yield backups.saved
    finally:
        backups.restore()
