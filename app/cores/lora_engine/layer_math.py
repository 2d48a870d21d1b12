"""The weight difference of each LoRA network type, as A1111/Forge and ComfyUI compute it.

Each function reads a :class:`~app.cores.lora_files.layers.FileLayer` and works in float32 on
the device it is given, whatever dtype the file stores, so that every kind is applied with the
same precision. The formulas are the formats' own (LyCORIS defines LoHa, LoKr and Tucker
LoCon; A1111's ``extensions-builtin/Lora/network_*.py`` and ComfyUI's
``comfy/weight_adapter/*.py`` apply them); where those projects differ, the comment at the
place says which one is followed and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from app.cores.lora_files.layers import (
    WEIGHT_DEPENDENT,
    DoRA,
    DoRAAxis,
    DoRAStrength,
    FileLayer,
    LayerKind,
)

FLOAT32 = torch.float32


def required_tensor(layer: FileLayer, role: str) -> torch.Tensor:
    tensor = layer.tensors.get(role)
    if tensor is None:
        raise ValueError(f"{layer.name}: a {layer.kind} layer needs a {role!r} tensor")
    return tensor


def _cols(tensor: torch.Tensor) -> int:
    return math.prod(tensor.shape[1:])


def _factor_size(layer: FileLayer, a: str, b: str, t: str) -> tuple[int, int]:
    """Size of ``a @ b``, or of its Tucker form, whose ``a`` is ``(rank, out)``, not
    ``(out, rank)`` (LyCORIS stores the Tucker factors as the core's mode matrices)."""
    wa, wb, core = required_tensor(layer, a), required_tensor(layer, b), layer.tensors.get(t)
    if core is None:
        return wa.shape[0], _cols(wb)
    return wa.shape[1], wb.shape[1] * math.prod(core.shape[2:])


def _lokr_w2_size(layer: FileLayer) -> tuple[int, int]:
    full = layer.tensors.get("lokr_w2")
    if full is not None:
        return full.shape[0], _cols(full)
    return _factor_size(layer, "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def delta_size(layer: FileLayer) -> tuple[int, int]:
    """(rows, columns) of the layer's weight difference, read from the tensor shapes alone.

    Columns are the product of all dims after the first (``in * kh * kw`` for a conv), so a
    layer can be checked against a model module before any maths runs. A layer without a
    weight part (FULL with only ``diff_b``, NORM with only ``b_norm``) gives
    ``(len(bias), 1)``, as a norm layer's 1-D weight does. A weight-dependent layer whose size
    is partly the base weight's ((IA)³) has no size of its own: :func:`dependent_fit` checks
    it against a weight's shape.
    """
    if layer.kind in WEIGHT_DEPENDENT and layer.kind is not LayerKind.GLORA:
        raise ValueError(f"{layer.name}: a {layer.kind} layer takes its size from the base weight")
    try:
        return _delta_size(layer)
    except IndexError as error:  # a tensor with fewer dims than its role has
        raise ValueError(f"{layer.name}: the {layer.kind} tensors do not fit: {error}") from error


def _delta_size(layer: FileLayer) -> tuple[int, int]:
    tensors = layer.tensors
    match layer.kind:
        case LayerKind.LORA:
            up, down, mid = (
                required_tensor(layer, "up"),
                required_tensor(layer, "down"),
                tensors.get("mid"),
            )
            cols = _cols(down) if mid is None else down.shape[1] * math.prod(mid.shape[2:])
            return up.shape[0], cols
        case LayerKind.LOHA:
            return _factor_size(layer, "hada_w1_a", "hada_w1_b", "hada_t1")
        case LayerKind.LOKR:
            w1 = tensors.get("lokr_w1")
            if w1 is None:
                rows1, cols1 = (
                    required_tensor(layer, "lokr_w1_a").shape[0],
                    _cols(required_tensor(layer, "lokr_w1_b")),
                )
            else:
                rows1, cols1 = w1.shape[0], _cols(w1)
            rows2, cols2 = _lokr_w2_size(layer)
            return rows1 * rows2, cols1 * cols2
        case LayerKind.FULL:
            diff = tensors.get("diff")
            if diff is None:
                return required_tensor(layer, "diff_b").shape[0], 1
            return diff.shape[0], _cols(diff)
        case LayerKind.NORM:
            norm = tensors.get("w_norm")
            return (norm if norm is not None else required_tensor(layer, "b_norm")).shape[0], 1
        case LayerKind.GLORA:
            return glora_size(layer, glora_old_layout(layer, None))
    raise ValueError(f"{layer.name}: unknown layer kind {layer.kind!r}")


def layer_rank(layer: FileLayer) -> int | None:
    """The rank shown to users, and the one ``alpha`` is divided by (None: no low-rank part).

    LoKr: A1111 (``network_lokr.py``) and ComfyUI (``lokr.py``) take ``lokr_w2_b``'s rank when
    the right factor is low rank, else ``lokr_w1_b``'s; LyCORIS reads ``lokr_w1_a``'s first,
    which is the same for the files it writes (both factors share one rank) except with a
    Tucker ``lokr_t2``, where it misreads ``lokr_w2_a``'s output dim. Both full: no rank.
    """
    tensors = layer.tensors
    match layer.kind:
        case LayerKind.LORA:
            return required_tensor(layer, "down").shape[0]
        case LayerKind.LOHA:
            return required_tensor(layer, "hada_w1_b").shape[0]
        case LayerKind.GLORA:
            return glora_rank(layer, glora_old_layout(layer, None))
        case LayerKind.LOKR:
            for role in ("lokr_w2_b", "lokr_w1_b"):
                if role in tensors:
                    return tensors[role].shape[0]
    return None


def layer_scale(layer: FileLayer) -> float:
    """``alpha / rank`` as A1111's ``calc_scale`` and ComfyUI compute it: 1 without an alpha or
    without a rank (FULL, NORM, LoKr with two full factors, where LyCORIS also forces 1)."""
    rank = layer_rank(layer)
    if layer.alpha is None or rank is None:
        return 1.0
    return layer.alpha / rank


def _factor(layer: FileLayer, a: str, b: str, t: str | None, device: torch.device) -> torch.Tensor:
    """``a @ b`` (2-D), or with a Tucker core ``t`` (r, r, *k) the LyCORIS rebuild
    ``W[o, c, *k] = sum_ij t[i, j, *k] a[i, o] b[j, c]`` (``rebuild_tucker``/``make_weight_cp``)."""
    wa = required_tensor(layer, a).to(device=device, dtype=FLOAT32)
    wb = required_tensor(layer, b).to(device=device, dtype=FLOAT32)
    core = layer.tensors.get(t) if t is not None else None
    if core is None:
        return wa.reshape(wa.shape[0], -1) @ wb.reshape(wb.shape[0], -1)
    core = core.to(device=device, dtype=FLOAT32)
    return torch.einsum("ij...,io,jc->oc...", core, wa.flatten(1), wb.flatten(1))


def _lora(layer: FileLayer, device: torch.device) -> torch.Tensor:
    up = required_tensor(layer, "up").to(device=device, dtype=FLOAT32)
    down = required_tensor(layer, "down").to(device=device, dtype=FLOAT32)
    up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    mid = layer.tensors.get("mid")
    if mid is None:
        return up @ down
    # LoCon "use_tucker": up (out, r, 1, 1), mid (r, r, kh, kw), down (r, in, 1, 1) are three
    # convolutions in a row, so W[o, c, *k] = sum_nm up[o, n] mid[n, m, *k] down[m, c]
    # (A1111 rebuild_cp_decomposition, ComfyUI tucker_weight_from_conv).
    mid = mid.to(device=device, dtype=FLOAT32)
    return torch.einsum("nm...,on,mc->oc...", mid, up, down)


def _lokr(layer: FileLayer, device: torch.device) -> torch.Tensor:
    w1 = layer.tensors.get("lokr_w1")
    if w1 is None:
        w1 = _factor(layer, "lokr_w1_a", "lokr_w1_b", None, device)
    w2 = layer.tensors.get("lokr_w2")
    if w2 is None:
        w2 = _factor(layer, "lokr_w2_a", "lokr_w2_b", "lokr_t2", device)
    w1, w2 = w1.to(device=device, dtype=FLOAT32), w2.to(device=device, dtype=FLOAT32)
    # A conv's right factor may be 4-D (full lokr_w2, or the Tucker rebuild): w1 (a, c) gains
    # trailing 1-dims so kron gives (a*b, c*d, kh, kw), as ComfyUI/A1111/LyCORIS make_kron do.
    # A 2-D right factor (b, d*kh*kw) gives the same numbers once reshaped.
    # torch.kron fails on a non-contiguous factor (the einsum rebuild is one), hence contiguous().
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1.contiguous(), w2.contiguous())


def _raw_delta(layer: FileLayer, device: torch.device) -> torch.Tensor | None:
    match layer.kind:
        case LayerKind.LORA:
            return _lora(layer, device)
        case LayerKind.LOHA:
            w1 = _factor(layer, "hada_w1_a", "hada_w1_b", "hada_t1", device)
            w2 = _factor(layer, "hada_w2_a", "hada_w2_b", "hada_t2", device)
            return w1 * w2
        case LayerKind.LOKR:
            return _lokr(layer, device)
        case LayerKind.FULL:
            diff = layer.tensors.get("diff")
            return None if diff is None else diff.to(device=device, dtype=FLOAT32)
        case LayerKind.NORM:
            norm = layer.tensors.get("w_norm")
            return None if norm is None else norm.to(device=device, dtype=FLOAT32)
        case kind if kind in WEIGHT_DEPENDENT:
            raise ValueError(f"{layer.name}: a {kind} layer has no weight difference of its own")
    raise ValueError(f"{layer.name}: unknown layer kind {layer.kind!r}")


def weight_delta(
    layer: FileLayer, shape: Sequence[int], device: torch.device
) -> torch.Tensor | None:
    """The layer's weight difference at the file's scale and strength 1, float32 on ``device``,
    in the module's weight ``shape`` (a linear layer stored as a 1x1 conv, or the reverse, only
    reshapes). None for a layer with no weight part (FULL with only ``diff_b``, NORM with only
    ``b_norm``). Raises ValueError when the numbers of elements differ or the tensors do not
    fit one another."""
    try:
        delta = _raw_delta(layer, device)
    except (RuntimeError, IndexError) as error:  # torch's shape errors: the tensors do not fit
        raise ValueError(f"{layer.name}: the {layer.kind} tensors do not fit: {error}") from error
    if delta is None:
        return None
    if delta.numel() != math.prod(shape):
        raise ValueError(
            f"{layer.name}: a {layer.kind} difference of shape {tuple(delta.shape)} does not fit"
            f" a weight of shape {tuple(shape)}"
        )
    scale = layer_scale(layer)
    return (delta if scale == 1.0 else delta * scale).reshape(tuple(shape))


def bias_delta(layer: FileLayer, device: torch.device) -> torch.Tensor | None:
    """The bias difference, float32 on ``device``: PEFT's ``lora_B.bias`` times the scale (PEFT
    merges ``lora_B.bias * scaling``, the bias being inside the scaled branch), FULL's
    ``diff_b`` and NORM's ``b_norm`` as they are; None otherwise."""
    role = {LayerKind.LORA: "bias", LayerKind.FULL: "diff_b", LayerKind.NORM: "b_norm"}
    tensor = layer.tensors.get(role.get(layer.kind, ""))
    if tensor is None:
        return None
    bias = tensor.to(device=device, dtype=FLOAT32)
    return bias * layer_scale(layer) if layer.kind == LayerKind.LORA else bias


def _norm(weight: torch.Tensor, axis: DoRAAxis) -> torch.Tensor:
    """L2 norm per output row (over in*kh*kw) or per input column (over out*kh*kw), kept
    broadcastable against ``weight``."""
    keep = 0 if axis == DoRAAxis.OUTPUT else 1
    dims = [d for d in range(weight.dim()) if d != keep]
    norm: torch.Tensor = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
    return norm


def dora_weight(
    weight: torch.Tensor, delta: torch.Tensor, dora: DoRA, strength: float
) -> torch.Tensor:
    """The new float32 weight of a DoRA layer from the base ``weight`` and the layer's
    difference ``delta`` at strength 1 (already scaled by alpha/rank).

    BLEND (Kohya/LyCORIS ``dora_scale``; A1111 ``apply_weight_decompose``, ComfyUI
    ``weight_decompose``): ``W + s * (m * (W + d) / (||W + d|| + eps) - W)``, eps being
    float32's as ComfyUI and LyCORIS add it. For the OUTPUT axis ComfyUI divides by ``||W||``
    instead; we divide by ``||W + d||`` on both axes, as LyCORIS does when it trains and merges
    a ``wd_on_out`` layer (the magnitudes were fitted to that norm), as PEFT and the DoRA paper
    define it, and as ComfyUI's own input axis does (its open PR #15458 makes the same change).
    LyCORIS's own merge blends a strength differently, ``(W + d) * (1 + s * (m / n - 1))``,
    which is not W at strength 0; we follow A1111/ComfyUI.

    INSIDE (PEFT ``lora_magnitude_vector``, the user's weight being part of PEFT's
    ``scaling``): ``m * (W + s*d) / ||W + s*d||`` per output row, as PEFT's DoRA merge computes
    it (the norm taken of the merged weight, detached, over in*kh*kw; no eps).
    """
    if weight.shape != delta.shape:
        raise ValueError(f"DoRA: delta {tuple(delta.shape)} != weight {tuple(weight.shape)}")
    if weight.dim() < 2:
        raise ValueError(f"DoRA needs a weight of 2 or more dims, not {tuple(weight.shape)}")
    weight = weight.to(FLOAT32)
    delta = delta.to(device=weight.device, dtype=FLOAT32)
    axis = 0 if dora.axis == DoRAAxis.OUTPUT else 1
    magnitude = dora.magnitude.to(device=weight.device, dtype=FLOAT32)
    if magnitude.numel() != weight.shape[axis]:
        raise ValueError(
            f"DoRA: {magnitude.numel()} magnitudes for a weight of shape {tuple(weight.shape)}"
            f" on the {dora.axis} axis"
        )
    view = [1] * weight.dim()
    view[axis] = -1
    magnitude = magnitude.reshape(view)
    if dora.strength == DoRAStrength.BLEND:
        merged = weight + delta
        norm = _norm(merged, dora.axis) + torch.finfo(FLOAT32).eps
        return weight + strength * (magnitude * merged / norm - weight)
    merged = weight + strength * delta
    return magnitude * merged / _norm(merged, dora.axis)


GLORA_ROLES = ("a1", "a2", "b1", "b2")


def glora_old_layout(layer: FileLayer, shape: Sequence[int] | None) -> bool:
    """Whether the file has LyCORIS's first GLoRA layout, ``b2 @ b1 + W @ a2 @ a1`` (b2
    ``(out, r)``, b1 ``(r, in)``, a2 ``(in, r)``, a1 ``(r, in)``; A1111 knows only this one),
    rather than today's ``b1 @ b2 + W @ a1 @ a2`` (``nn.Linear`` weights: b1 ``(out, r)``, b2
    ``(r, in[, kh, kw])``, a1 ``(in, r)``, a2 ``(r, in)``). The shapes decide as ComfyUI's
    ``glora.py`` does; when both layouts fit (square matrices), ComfyUI takes the old one if
    the weight is square with as many rows as ``a2``; without a weight (the upload check) the
    layout whose rank is the smaller is taken, which is ComfyUI's choice for every file whose
    rank is below its width."""
    a1, a2, b1, b2 = (required_tensor(layer, role).shape for role in GLORA_ROLES)
    old = b2[1] == b1[0] == a1[0] == a2[1]
    new = b2[0] == b1[1] == a1[1] == a2[0]
    if old and new:
        if shape is not None:
            return a2[0] == shape[0] and len(shape) > 1 and shape[0] == shape[1]
        return a1[0] <= a2[0]
    return old


def glora_rank(layer: FileLayer, old: bool) -> int:
    """LyCORIS ``lora_dim``: ``a1``'s rows in the old layout, ``a2``'s in today's (ComfyUI's)."""
    return int(required_tensor(layer, "a1" if old else "a2").shape[0])


def glora_size(layer: FileLayer, old: bool) -> tuple[int, int]:
    b1, b2 = required_tensor(layer, "b1"), required_tensor(layer, "b2")
    return (b2.shape[0], _cols(b1)) if old else (b1.shape[0], _cols(b2))
