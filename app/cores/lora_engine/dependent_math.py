"""Layers whose change depends on the base weight: DoRA, LyCORIS (IA)³, GLoRA and OFT.

They cannot be summed with the additive kinds (``layer_math``): fusion adds every additive
difference first, then applies these one after the other, in request order, to the running
float32 weight (as A1111 and ComfyUI apply them). :func:`dependent_fit` says whether such a
layer can change a weight of a given shape, :func:`dependent_weight` computes the new weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from app.cores.lora_engine.layer_math import (
    FLOAT32,
    GLORA_ROLES,
    dora_weight,
    glora_old_layout,
    glora_rank,
    glora_size,
    required_tensor,
    weight_delta,
)
from app.cores.lora_files.layers import FileLayer, LayerKind


def _flag(layer: FileLayer, role: str) -> bool | None:
    """A 0/1 flag tensor's value; None when only its shape is known (a ``meta`` tensor)."""
    tensor = required_tensor(layer, role)
    if tensor.numel() != 1:
        raise ValueError(f"{layer.name}: its {role!r} is not a single value")
    if tensor.device.type == "meta":
        return None
    return bool(tensor.reshape(()).item())


def _ia3_fit(layer: FileLayer, shape: Sequence[int] | None) -> str | None:
    factors = required_tensor(layer, "weight")
    count = factors.numel()
    # LyCORIS writes (n,) for a linear layer and (1, n, 1, 1) for a convolution.
    if factors.ndim > 1 and sorted(factors.shape)[:-1] != [1] * (factors.ndim - 1):
        return f"has (IA)³ factors of shape {tuple(factors.shape)}, not one per channel"
    on_input = _flag(layer, "on_input")
    if shape is None or on_input is None:
        return None
    if len(shape) < 2:
        return f"scales a weight of shape {tuple(shape)}, which has no rows and columns"
    axis, what = (1, "input channels") if on_input else (0, "output rows")
    if shape[axis] != count:
        return f"scales {count} {what}; the loaded model's weight has {shape[axis]}"
    return None


def _glora_fit(layer: FileLayer, shape: Sequence[int] | None) -> str | None:
    old = glora_old_layout(layer, shape)
    a1, a2, b1, b2 = (required_tensor(layer, role).flatten(1).shape for role in GLORA_ROLES)
    rows, cols = glora_size(layer, old)
    if old:  # b2 (out, r) b1 (r, cols); W (out, cols) @ a2 (cols, r) @ a1 (r, cols)
        fits = b2[1] == b1[0] == a1[0] == a2[1] and a2[0] == a1[1] == cols
        channels = cols
    else:  # b1 (out, r) b2 (r, cols); W's input channels @ a1 (in, r) @ a2 (r, in)
        fits = b1[1] == b2[0] == a1[1] == a2[0] and a1[0] == a2[1]
        channels = a1[0]
    if not fits:
        shapes = ", ".join(str(tuple(required_tensor(layer, role).shape)) for role in GLORA_ROLES)
        return f"has GLoRA matrices a1, a2, b1, b2 of shapes {shapes}, which do not fit"
    if shape is None:
        return None
    weight_cols = math.prod(shape[1:])
    if (rows, cols) != (shape[0], weight_cols) or len(shape) < 2 or shape[1] != channels:
        return f"changes a {rows}x{cols} weight; the loaded model's is {shape[0]}x{weight_cols}"
    return None


def _glora_weight(layer: FileLayer, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """``W + s * alpha/r * (B + W A)`` on the running weight ``W`` (ComfyUI ``glora.py``;
    LyCORIS ``GLoRAModule.make_weight``, ``get_diff_weight`` at a multiplier). Today's layout:
    ``B = b1 @ b2``, ``W A`` maps each kernel position's input channels through ``a1 @ a2``;
    the old one: ``B = b2 @ b1``, ``W A = (W.flatten(1) @ a2) @ a1``. The scale is
    ``alpha / r`` as LyCORIS and ComfyUI take it; A1111 gives its GLoRA no rank, so scale 1."""
    old = glora_old_layout(layer, weight.shape)
    a1, a2, b1, b2 = (
        required_tensor(layer, role).to(device=weight.device, dtype=FLOAT32).flatten(1)
        for role in GLORA_ROLES
    )
    if old:
        diff = (b2 @ b1 + (weight.flatten(1) @ a2) @ a1).reshape(weight.shape)
    else:
        through_a = torch.einsum("oi...,ir->or...", weight, a1)
        through_a = torch.einsum("or...,ri->oi...", through_a, a2)
        diff = through_a + (b1 @ b2).reshape(weight.shape)
    rank = glora_rank(layer, old)
    scale = 1.0 if layer.alpha is None else layer.alpha / rank
    return weight + (strength * scale) * diff


def _oft_blocks(layer: FileLayer) -> tuple[torch.Tensor, bool]:
    """The skew-symmetric blocks' source and whether they are constrained (``oft_blocks``
    with an alpha; the older ``oft_diag`` never is)."""
    blocks = layer.tensors.get("oft_blocks")
    if blocks is not None:
        return blocks, True
    return required_tensor(layer, "oft_diag"), False


def _oft_fit(layer: FileLayer, shape: Sequence[int] | None) -> str | None:
    blocks, _constrained = _oft_blocks(layer)
    if blocks.ndim != 3 or blocks.shape[1] != blocks.shape[2]:
        return f"has OFT blocks of shape {tuple(blocks.shape)}, not (blocks, size, size)"
    if shape is None:
        return None
    rows = int(blocks.shape[0] * blocks.shape[1])
    if len(shape) < 2 or shape[0] != rows:
        return f"rotates {rows} output rows; the loaded model's weight has {shape[0]}"
    return None


def _oft_weight(layer: FileLayer, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """LyCORIS ``DiagOFTModule``: each block ``B`` gives ``Q = B - B^T``, scaled down to norm
    ``alpha * rows`` when the whole set is longer (only ``oft_blocks`` with an alpha > 0),
    the Cayley rotation ``R = (I + Q)(I - Q)^-1``, blended with the identity by the strength,
    applied as ``R^T`` to that block of the weight's output rows. ComfyUI constrains with
    alpha alone and applies the strength twice, A1111 skips the Cayley transform; LyCORIS,
    which trained the file, is followed."""
    source, constrained = _oft_blocks(layer)
    blocks = source.to(device=weight.device, dtype=FLOAT32)
    count, size = int(blocks.shape[0]), int(blocks.shape[1])
    skew = blocks - blocks.transpose(1, 2)
    if constrained and layer.alpha is not None and layer.alpha > 0:
        limit = layer.alpha * weight.shape[0]
        norm = float(torch.linalg.vector_norm(skew).item())  # over every block at once
        if norm + 1e-8 > limit:
            skew = skew * (limit / (norm + 1e-8))
    eye = torch.eye(size, device=weight.device, dtype=FLOAT32).expand(count, size, size)
    rotation = torch.linalg.solve((eye - skew).transpose(1, 2), (eye + skew).transpose(1, 2))
    rotation = rotation.transpose(1, 2)  # (I + Q)(I - Q)^-1, solved rather than inverted
    blended = strength * rotation + (1 - strength) * eye
    rows = weight.reshape(count, size, -1)
    return torch.einsum("knm,knc->kmc", blended, rows).reshape(weight.shape)


def dependent_fit(layer: FileLayer, shape: Sequence[int] | None) -> str | None:
    """Why a weight-dependent layer cannot change a module weight of ``shape`` (a phrase that
    follows the layer's name), None when it can. ``shape`` None (the upload check, shapes from
    the header only): whether the layer's own tensors fit one another."""
    try:
        match layer.kind:
            case LayerKind.IA3:
                return _ia3_fit(layer, shape)
            case LayerKind.GLORA:
                return _glora_fit(layer, shape)
            case LayerKind.OFT:
                return _oft_fit(layer, shape)
    except (ValueError, IndexError) as error:
        return f"has tensors that do not fit one another ({error})"
    raise ValueError(f"{layer.name}: a {layer.kind} layer does not depend on the base weight")


def _ia3_weight(layer: FileLayer, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """LyCORIS ``IA3Module.make_weight``: ``W * (1 + s * w)``, the factors ``w`` along the
    output rows, or along the input channels (dim 1) when ``on_input`` is set. A1111
    (``network_ia3.py``) adds ``s * (W * w)``, the same; ComfyUI has no (IA)³ adapter."""
    factors = required_tensor(layer, "weight").to(device=weight.device, dtype=FLOAT32).flatten()
    view = [1] * weight.dim()
    view[1 if _flag(layer, "on_input") else 0] = -1
    return weight * (1 + strength * factors.reshape(view))


def dependent_weight(layer: FileLayer, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """The new float32 weight of a layer that depends on the base weight, from the running
    float32 ``weight`` (the base with every additive layer already added) at ``strength``:
    a DoRA layer (:func:`dora_weight`) or a :data:`WEIGHT_DEPENDENT` kind. Raises ValueError
    when the layer does not fit ``weight``."""
    weight = weight.to(FLOAT32)
    if layer.dora is not None:
        delta = weight_delta(layer, weight.shape, weight.device)
        if delta is None:
            raise ValueError(f"{layer.name}: a DoRA layer without a weight difference")
        return dora_weight(weight, delta, layer.dora, strength)
    problem = dependent_fit(layer, weight.shape)
    if problem is not None:
        raise ValueError(f"{layer.name} {problem}")
    match layer.kind:
        case LayerKind.IA3:
            return _ia3_weight(layer, weight, strength)
        case LayerKind.GLORA:
            return _glora_weight(layer, weight, strength)
        case LayerKind.OFT:
            return _oft_weight(layer, weight, strength)
    raise ValueError(f"{layer.name}: a {layer.kind} layer does not depend on the base weight")
