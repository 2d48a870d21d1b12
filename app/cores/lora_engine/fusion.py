"""Fuse prepared LoRAs into the model's weights for one generation; restore them exactly.

Each touched weight is written once: the weighted differences of every LoRA on it are added
in one pass (plain LoRAs as one matmul of their stacked factors), so the denoising loop runs
at the base model's speed; ``backups`` keeps the original values (swapped out on the CPU,
copied to host memory on a GPU) and puts them back afterwards: the base weights are
bit-identical after every generation (``fuse_lora``/``unfuse_lora`` are not: subtracting
again leaves rounding errors). DoRA
layers and the weight-dependent kinds ((IA)³, GLoRA, OFT) are not additive: they change the
summed weight, one after the other, in the order the request lists them (as A1111 and
ComfyUI apply them).

Runs with the pipeline lock held.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import replace

import torch

from app.cores.lora_engine.backups import BackupPool
from app.cores.lora_engine.dependent_math import dependent_weight
from app.cores.lora_engine.key_mapping import COMPONENTS, KeyMapper
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


class _Scratch:
    """A reused buffer per (device, dtype) for one module's stacked factors: each factor is
    copied once, straight into it (cast and scaled on the way), instead of a cast, a scale
    and a concatenation allocating new tensors for every module of every request (on an
    SDXL-sized set, a gigabyte of fresh memory faulted in per switch)."""

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
        flat = self._flat.get((device, dtype))
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, device=device, dtype=dtype)
            self._flat[(device, dtype)] = flat
        return flat[:numel]


def _stacked_factors(
    plain: Sequence[_Contribution], device: torch.device, dtype: torch.dtype, scratch: _Scratch
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(w * s * up @ down)`` of plain LoRA layers is one matmul of the stacked factors,
    ``[up_1 .. up_n] @ [w_1 s_1 down_1; ..; w_n s_n down_n]``: one pass over the weight
    instead of one per LoRA (rows x columns, flattened). Views into ``scratch``, valid until
    the next call."""
    ups_in, downs_in = [], []
    for prepared, target, _strength in plain:
        up = prepared.layer.tensors["up"]
        ups_in.append((up if target.rows is None else up[target.rows]).flatten(1))
        downs_in.append(prepared.layer.tensors["down"].flatten(1))
    rows, columns = ups_in[0].shape[0], downs_in[0].shape[1]
    rank = sum(down.shape[0] for down in downs_in)
    flat = scratch.take(device, dtype, rows * rank + rank * columns)
    ups = flat[: rows * rank].view(rows, rank)
    downs = flat[rows * rank :].view(rank, columns)
    start = 0
    for (prepared, _target, strength), up, down in zip(plain, ups_in, downs_in, strict=True):
        end = start + down.shape[0]
        scale = strength * layer_scale(prepared.layer)
        # Factors rest in host memory (pinned for a GPU): each layer's go over as it is fused.
        # Scaled after the copy, in the matmul's dtype (a small slice, still in cache).
        ups[:, start:end].copy_(up, non_blocking=True)
        downs[start:end].copy_(down, non_blocking=True)
        downs[start:end].mul_(scale)
        start = end
    return ups, downs


def _matmul_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the stacked factors are multiplied in, straight into the weight; None where
    the difference is summed in float32 first.

    float32 weights: float32. bfloat16 weights, and float16 ones on a GPU: their own dtype
    (bfloat16 on a CPU with AMX multiplies 3x faster than float32: measured on the bench
    machine). The matmul accumulates in float32 and rounds once, where summing in float32 and
    adding the rounded difference rounds twice; the factors lose nothing real either, as
    published LoRAs are stored in half precision. float16 on the CPU: no fast kernels.
    """
    if weight.dtype in (torch.float32, torch.bfloat16):
        return weight.dtype
    if weight.dtype == torch.float16 and weight.device.type != "cpu":
        return weight.dtype
    return None


def _fuse_module(
    module: torch.nn.Module,
    contributions: Sequence[_Contribution],
    backups: BackupPool,
    scratch: _Scratch,
) -> None:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    device = weight.device
    plain = [c for c in contributions if _is_plain(c[0], c[1])]
    others = [c for c in contributions if not _is_plain(c[0], c[1])]
    dependent = [(p, w) for p, _target, w in others if _depends_on_weight(p)]
    additive = [c for c in others if not _depends_on_weight(c[0])]
    current, target = backups.writable(weight)
    matmul_dtype = _matmul_dtype(weight)
    if (
        plain
        and not additive
        and not dependent
        and matmul_dtype is not None
        and weight.ndim > 1
        and target.is_contiguous()
    ):
        # The common case: one addmm from the current weight into the target, no buffer.
        rows = weight.shape[0]
        ups, downs = _stacked_factors(plain, device, matmul_dtype, scratch)
        torch.addmm(current.reshape(rows, -1), ups, downs, out=target.view(rows, -1))
    else:
        total = torch.zeros(weight.shape, dtype=torch.float32, device=device)
        if plain:
            ups, downs = _stacked_factors(plain, device, torch.float32, scratch)
            total += (ups @ downs).view(weight.shape)
        for prepared, place, strength in additive:
            into = place.into if place.into is not None else slice(None)
            delta = _rows_of(prepared, place, device)
            if delta is not None:
                total[into] += strength * delta.reshape(total[into].shape)
        if dependent:
            changed = current.to(torch.float32) + total
            for prepared, strength in dependent:
                changed = dependent_weight(prepared.layer, changed, strength)
            target.copy_(changed.to(weight.dtype))
        else:
            torch.add(current, total.to(weight.dtype), out=target)
    _fuse_bias(module, contributions, backups)


def _fuse_bias(
    module: torch.nn.Module, contributions: Sequence[_Contribution], backups: BackupPool
) -> None:
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor):
        return
    total: torch.Tensor | None = None
    for prepared, place, strength in contributions:
        delta = _bias_rows(prepared, place, bias.device)
        if delta is None:
            continue
        if total is None:
            total = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        into = place.into if place.into is not None else slice(None)
        total[into] += strength * delta
    if total is not None:
        current, target = backups.writable(bias)
        torch.add(current, total.to(bias.dtype), out=target)


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
            modules = {key: mapper.module(Target(*key)) for key in per_module}
            present = {
                id(tensor)
                for module in modules.values()
                for tensor in (getattr(module, "weight", None), getattr(module, "bias", None))
                if tensor is not None
            }
            signature = _signature(selection)
            if not backups.reinstall(signature, present):
                scratch = _Scratch()
                for key, contributions in per_module.items():
                    _fuse_module(modules[key], contributions, backups, scratch)
                backups.keep(signature)
        yield backups.saved
    finally:
        backups.restore()


def _signature(selection: Sequence[tuple[PreparedLoRA, LoRARequest]]) -> Hashable:
    """What decides the fused weights: each LoRA's content and weight per component, in
    request order (the weight-dependent kinds apply in that order)."""
    return tuple(
        (request.content_key, tuple(request.weight_for(c) for c in COMPONENTS))
        for _prepared, request in selection
    )
