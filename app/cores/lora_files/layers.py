"""The engine's vocabulary: one LoRA file layer, and where in the model it lands.

A LoRA file is read once into :class:`FileLayer` objects, one per module the file names, with
the tensors the format stores for it under normalised role names (see :data:`ROLES`). Each
file layer is then mapped onto one or more :class:`Target` modules of the loaded model (a
fused ``qkv`` layer of a FLUX.1 or SD3 file lands on three projections, each taking a slice of
the rows). The layer maths (:mod:`~app.cores.lora_engine.layer_math`) turns a file layer into
a weight difference in the file module's shape; fusion adds each target's rows of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import torch


class LayerKind(StrEnum):
    """How a layer's weight difference is computed (the network types of A1111/ComfyUI)."""

    LORA = "lora"
    """``up @ down`` (LoRA, LoCon), or ``up x mid x down`` with a Tucker ``mid`` core."""
    LOHA = "loha"
    """LyCORIS LoHa: the Hadamard product of two low-rank products (optional Tucker cores)."""
    LOKR = "lokr"
    """LyCORIS LoKr: the Kronecker product of two factors, each full or low rank."""
    FULL = "full"
    """LyCORIS full: the weight difference itself (``diff``, ``diff_b``)."""
    NORM = "norm"
    """A norm layer's weight and bias differences (``w_norm``, ``b_norm``)."""
    IA3 = "ia3"
    """LyCORIS (IA)³: one factor per output row (or input column, ``on_input``) of the base
    weight, ``W * (1 + w)``; weight-dependent (see :data:`WEIGHT_DEPENDENT`)."""
    GLORA = "glora"
    """LyCORIS GLoRA: ``W @ A + B`` with low-rank ``A`` (``a1``, ``a2``) and ``B`` (``b1``,
    ``b2``); weight-dependent."""
    OFT = "oft"
    """LyCORIS diag-OFT: a block-diagonal rotation of the base weight's output rows (Cayley
    transform of skew-symmetric blocks, ``oft_blocks``; older files ``oft_diag``);
    weight-dependent."""


ROLES: Mapping[LayerKind, frozenset[str]] = {
    LayerKind.LORA: frozenset({"down", "up", "mid", "bias"}),
    LayerKind.LOHA: frozenset(
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
    ),
    LayerKind.LOKR: frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    ),
    LayerKind.FULL: frozenset({"diff", "diff_b"}),
    LayerKind.NORM: frozenset({"w_norm", "b_norm"}),
    LayerKind.IA3: frozenset({"weight", "on_input"}),
    LayerKind.GLORA: frozenset({"a1", "a2", "b1", "b2"}),
    LayerKind.OFT: frozenset({"oft_blocks", "oft_diag"}),
}
"""The tensor roles of each kind. ``down``/``up``/``mid`` are Kohya's ``lora_down``/``lora_up``/
``lora_mid`` and PEFT's ``lora_A``/``lora_B``; ``bias`` is PEFT's ``lora_B.bias``; the LyCORIS
roles keep their names. Any additive kind may also carry a DoRA magnitude (:class:`DoRA`)."""

WEIGHT_DEPENDENT: frozenset[LayerKind] = frozenset({LayerKind.IA3, LayerKind.GLORA, LayerKind.OFT})
"""Kinds whose change is a function of the base weight, not a difference to add: fusion applies
them after the additive sum, on the running weight, in request order (as DoRA layers)."""


class DoRAAxis(StrEnum):
    OUTPUT = "output"
    """One magnitude per output row (PEFT's ``lora_magnitude_vector``; LyCORIS ``wd_on_out``)."""
    INPUT = "input"
    """One magnitude per input column (Kohya/LyCORIS ``dora_scale`` of shape ``(1, in)``)."""


class DoRAStrength(StrEnum):
    """How the user's weight enters a DoRA layer; the two conventions differ."""

    INSIDE = "inside"
    """PEFT: the weight scales the low-rank part before the norm is taken,
    ``W' = m * (W + w*d) / ||W + w*d||``."""
    BLEND = "blend"
    """A1111/ComfyUI (Kohya ``dora_scale``): the decomposed weight is computed at full strength
    and the user's weight blends towards it, ``W' = W + w * (m * (W + d) / ||W + d|| - W)``."""


@dataclass(frozen=True)
class DoRA:
    magnitude: torch.Tensor
    axis: DoRAAxis
    strength: DoRAStrength


@dataclass(frozen=True)
class FileLayer:
    """One module's tensors in a LoRA file."""

    name: str
    """The module as the file names it, without the role suffix (e.g.
    ``lora_unet_input_blocks_4_1_proj_in``,
    ``transformer.single_transformer_blocks.0.attn.to_q``)."""
    kind: LayerKind
    tensors: Mapping[str, torch.Tensor]
    """Role (from :data:`ROLES`) -> tensor, as stored in the file (any float dtype)."""
    alpha: float | None = None
    """The layer's alpha, when the file gives one (Kohya/LyCORIS ``.alpha``, PEFT ``lora_alpha``
    metadata); the scale is ``alpha / rank`` as A1111 computes it, 1 without one."""
    dora: DoRA | None = None

    @property
    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        if self.dora is not None:
            total += self.dora.magnitude.numel() * self.dora.magnitude.element_size()
        return total


@dataclass(frozen=True)
class Target:
    """Where (part of) a file layer lands: ``rows`` of its weight difference are added to rows
    ``into`` of the weight of ``module`` in the pipeline component ``component`` (``None``:
    all rows)."""

    component: str
    module: str
    rows: slice | None = None
    into: slice | None = None
