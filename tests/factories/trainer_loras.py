"""LoRA files as the real trainers write them, for the tiny model of every family, together with
the weight change each file must cause.

:func:`write_trainer_lora` writes one file in a trainer's format (key names, tensor shapes and
dtypes, ``__metadata__``) for the tiny pipeline of a family and returns a :class:`WrittenLoRA`
whose ``expected`` gives, per ``(component, module)`` the file changes, what applying it at
weight 1 must do to that module (:class:`ExpectedChange`). The changes are computed here, by
each format's own formula, from the tensors *as stored* (after rounding to the file's dtype);
fused layers are split by rows as the model has them. Which modules each trainer adapts and
what it calls them: ``tests.factories.trainer_names`` (with its sources).

====================== =========================================================================
``kohya``              sd-scripts LoRA: ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
                       (0-d, the file's dtype); ``alpha / rank`` scales ``up @ down``. SD 1.x/2.x
                       and SDXL with ``block_dims`` / ``block_alphas``: rank and alpha differ
                       between U-Net blocks. fp16 (SD3, FLUX: bf16, T5 trained too).
``kohya-locon``        as ``kohya`` with ``conv_dim``: 3x3 convs too (``down`` ``(r, in, 3, 3)``).
``lycoris-locon``      LyCORIS LoCon, Tucker: 3x3 convs get ``.lora_mid.weight`` ``(r, r, 3, 3)``
                       between 1x1 ``down`` and ``up`` (``lycoris/modules/locon.py``).
``lycoris-loha``       ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``; 3x3 convs with Tucker cores
                       ``hada_t1``/``hada_t2`` (``lycoris/modules/loha.py``).
``lycoris-lokr``       ``kron(lokr_w1, w2) * scale`` with ``w2`` full (``lokr_w2``, scale 1 whatever
                       ``alpha`` says), ``lokr_w2_a @ lokr_w2_b`` or Tucker ``lokr_t2`` (scale
                       ``alpha / rank``, rank = rows of ``lokr_w2_b``); factors as LyCORIS
                       ``factorization`` and full-matrix rule choose (``lycoris/modules/lokr.py``).
``lycoris-full``       the difference itself: ``.diff`` and, with a bias, ``.diff_b``; no alpha.
``lycoris-dora``       LoCon, ``dora_wd``: ``.dora_scale`` ``(out, 1)`` / ``(out, 1, 1, 1)``, the
                       norm per output row (LyCORIS since 2024-12, ``wd_on_output=True``).
``lycoris-dora-input`` as ``lycoris-dora``, ``dora_scale`` ``(1, in)`` / ``(1, in, 1, 1)``: the
                       norm per input column (LyCORIS before 2024-12; ``wd_on_output=False``).
``lycoris-norm``       LoCon with ``train_norm``: norm layers get ``.w_norm`` / ``.b_norm``, added.
``peft``               diffusers/PEFT: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight``;
                       alpha other than the rank only in ``lora_adapter_metadata`` (diffusers'
                       ``_save_lora_weights``). fp32 (diffusers' scripts); FLUX fp16 (ai-toolkit).
``peft-dora``          as ``peft`` with ``.lora_magnitude_vector`` ``(out,)`` / ``(1, out, 1, 1)``.
``bfl``                FLUX: ``diffusion_model.<BFL module>.lora_A.weight`` / ``.lora_B``, bf16.
``xlabs``              FLUX: x-flux's ``...processor.qkv_lora1.down.weight`` / ``.up.weight``,
                       fp32 (``train_flux_lora_deepspeed.py`` saves the fp32 processors), no alpha.
====================== =========================================================================

DoRA is not additive: its :class:`ExpectedChange` carries the low-rank difference and the
magnitude, and :meth:`ExpectedChange.new_weight` applies the format's rule. At weight 1 every
rule gives ``m * (W + d) / ||W + d||``; at another weight ``w`` PEFT scales ``d`` inside the
norm (``m * (W + w d) / ||W + w d||``) while A1111/ComfyUI blend a ``dora_scale`` layer
(``W + w (m (W + d) / ||W + d|| - W)``).

Weights come from one seeded ``torch.Generator`` (the global RNG is untouched): the same
arguments write the same bytes. Each difference has entries of about ``strength / sqrt(fan_in)``
whatever the rank and alpha (the stored factors absorb the scale), enough to change the tiny
model's image visibly while keeping it finite.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch

from tests.factories import trainer_names as names
from tests.factories.family_models import Family
from tests.factories.trainer_names import (
    FORMATS,
    TRAINER_CASES,
    LayerPlan,
    NamedLayer,
    TrainerCase,
    TrainerFormat,
)

__all__ = [
    "FORMATS",
    "TRAINER_CASES",
    "DoRAExpectation",
    "ExpectedChange",
    "TrainerCase",
    "TrainerFormat",
    "WrittenLoRA",
    "default_dtype",
    "write_trainer_lora",
]


@dataclass(frozen=True)
class DoRAExpectation:
    """A DoRA layer's magnitude and how a weight other than 1 enters it."""

    magnitude: torch.Tensor
    """float32, as stored: ``(out, 1[, 1, 1])`` or ``(1, in[, 1, 1])``, PEFT ``(out,)`` or
    ``(1, out, 1, 1)``."""
    axis: int
    """0: one magnitude per output row; 1: one per input column."""
    rule: Literal["peft", "blend"]
    """``peft``: ``m * (W + w d) / ||W + w d||`` (PEFT, diffusers); ``blend``: ``W + w (m (W + d)
    / ||W + d|| - W)`` (A1111 and ComfyUI for a ``dora_scale`` layer)."""

    def new_weight(self, base: torch.Tensor, delta: torch.Tensor, weight: float) -> torch.Tensor:
        if self.rule == "peft":
            return self._decomposed(base + weight * delta)
        return base + weight * (self._decomposed(base + delta) - base)

    def _decomposed(self, adapted: torch.Tensor) -> torch.Tensor:
        dims = tuple(d for d in range(adapted.dim()) if d != self.axis)
        norm = torch.linalg.vector_norm(adapted, dim=dims, keepdim=True)
        decomposed: torch.Tensor = adapted * (self.magnitude.reshape(norm.shape) / norm)
        return decomposed


@dataclass(frozen=True)
class ExpectedChange:
    """What applying the file at weight 1 does to one module."""

    weight: torch.Tensor
    """float32 difference added to the weight; with DoRA, the low-rank difference ``d``."""
    bias: torch.Tensor | None = None
    dora: DoRAExpectation | None = None

    def new_weight(self, base: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """The module's weight after applying the file at ``weight`` to ``base``."""
        if self.dora is None:
            return base + weight * self.weight
        return self.dora.new_weight(base, self.weight, weight)

    def new_bias(self, base: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        return base if self.bias is None else base + weight * self.bias


@dataclass(frozen=True)
class WrittenLoRA:
    path: Path
    family: Family
    trainer_format: TrainerFormat
    expected: dict[tuple[str, str], ExpectedChange]
    """(component, module name inside it) -> the change; no other module may change."""
    metadata: dict[str, str] = field(default_factory=dict)


# --- the layer maths, each format's own formula -----------------------------------------------


@dataclass
class _Made:
    tensors: dict[str, torch.Tensor]
    """Role (the key suffix of the Kohya/LyCORIS style) -> tensor in the file's dtype."""
    delta: torch.Tensor
    """float32 weight difference at weight 1, in the layer's shape (alpha scale included)."""
    bias: torch.Tensor | None = None
    alpha: float | None = None
    """The alpha the file writes for the layer (``None``: none)."""


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


def _factorization(dimension: int) -> tuple[int, int]:
    """LyCORIS' ``factorization(dimension, -1)``: the divisor pair ``m <= n`` of least sum."""
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def _cores(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Tucker product: ``t`` (r, r, kh, kw), ``a`` (r, out), ``b`` (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("ijhw,ip,jq->pqhw", t, a, b)


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Kronecker product over the first two axes; ``w2``'s kernel axes carry through."""
    a, c = w1.shape
    p, q, *kernel = w2.shape
    return torch.einsum("ac,pq...->apcq...", w1, w2).reshape(a * p, c * q, *kernel)


def _make(
    generator: torch.Generator,
    layer: NamedLayer,
    plan: LayerPlan,
    dtype: torch.dtype,
    strength: float,
) -> _Made:
    """The layer's tensors as the file stores them, and the difference they make by the
    format's formula (from the stored values)."""
    rank, alpha = plan.dims(layer)
    std = strength / math.sqrt(math.prod(layer.shape[1:]))
    tucker = plan.tucker and layer.kernel not in ((), (1, 1))
    if layer.is_norm:  # LyCORIS NormModule: w_norm / b_norm, added as they are
        return _additive(generator, layer, ("w_norm", "b_norm"), 0.2 * strength, dtype)
    if plan.algorithm == "full":  # LyCORIS full: diff / diff_b, added as they are
        return _additive(generator, layer, ("diff", "diff_b"), std, dtype)
    if plan.algorithm == "lokr":
        return _lokr(generator, layer, rank, alpha, tucker, dtype, std)
    scale = 1.0 if alpha is None else alpha / rank  # the stored factors absorb it
    if plan.algorithm == "loha":
        return _loha(generator, layer, rank, alpha, tucker, dtype, std / scale)
    out, inner, kernel = layer.shape[0], layer.shape[1], layer.kernel
    ones = (1,) * len(kernel)
    # down and mid keep unit-variance outputs; up sizes the difference (and absorbs the scale)
    if tucker:  # LoCon with a Tucker core: 1x1 down, kxk mid, 1x1 up
        roles = {
            "lora_down.weight": _randn(generator, rank, inner, *ones) / math.sqrt(inner),
            "lora_mid.weight": _randn(generator, rank, rank, *kernel)
            / math.sqrt(rank * math.prod(kernel)),
        }
    else:
        fan_in = math.prod(layer.shape[1:])
        roles = {"lora_down.weight": _randn(generator, rank, *layer.shape[1:]) / math.sqrt(fan_in)}
    up_std = strength / math.sqrt(rank) / scale
    roles["lora_up.weight"] = _randn(generator, out, rank, *ones) * up_std
    s = {role: value.to(dtype) for role, value in roles.items()}
    up = s["lora_up.weight"].float().flatten(1)
    down = s["lora_down.weight"].float().flatten(1)
    if tucker:
        delta = torch.einsum("oa,abhw,bi->oihw", up, s["lora_mid.weight"].float(), down)
    else:
        delta = (up @ down).reshape(layer.shape)
    return _Made(s, delta * scale, alpha=alpha)


def _additive(
    generator: torch.Generator,
    layer: NamedLayer,
    roles: tuple[str, str],
    std: float,
    dtype: torch.dtype,
) -> _Made:
    """A weight difference (and bias difference, when the module has a bias) stored as is."""
    weight = _randn(generator, *layer.shape).mul(std).to(dtype)
    stored = {roles[0]: weight}
    if layer.bias:
        stored[roles[1]] = _randn(generator, layer.shape[0]).mul(std).to(dtype)
    bias = stored[roles[1]].float() if layer.bias else None
    return _Made(stored, weight.float(), bias)


def _loha(
    generator: torch.Generator,
    layer: NamedLayer,
    rank: int,
    alpha: float | None,
    tucker: bool,
    dtype: torch.dtype,
    std: float,
) -> _Made:
    """LyCORIS LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``, rank = rows of ``w1_b``;
    with Tucker cores each product is ``t x_0 a x_1 b`` (``a`` (r, out), ``b`` (r, in))."""
    out, kernel = layer.shape[0], layer.kernel
    if tucker:
        roles = {
            "hada_t1": _randn(generator, rank, rank, *kernel) / rank,
            "hada_w1_a": _randn(generator, rank, out),
            "hada_w1_b": _randn(generator, rank, layer.shape[1]),
            "hada_t2": _randn(generator, rank, rank, *kernel) / rank,
            "hada_w2_a": _randn(generator, rank, out) * std,
            "hada_w2_b": _randn(generator, rank, layer.shape[1]),
        }
    else:
        fan_in = math.prod(layer.shape[1:])
        roles = {
            "hada_w1_a": _randn(generator, out, rank) / math.sqrt(rank),
            "hada_w1_b": _randn(generator, rank, fan_in),
            "hada_w2_a": _randn(generator, out, rank) * std / math.sqrt(rank),
            "hada_w2_b": _randn(generator, rank, fan_in),
        }
    s = {role: value.to(dtype) for role, value in roles.items()}
    f = {role: value.float() for role, value in s.items()}
    if tucker:
        first = _cores(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
        product = first * _cores(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
    else:
        product = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    scale = 1.0 if alpha is None else alpha / rank
    return _Made(s, product.reshape(layer.shape) * scale, alpha=alpha)


def _lokr(
    generator: torch.Generator,
    layer: NamedLayer,
    rank: int,
    alpha: float | None,
    tucker: bool,
    dtype: torch.dtype,
    std: float,
) -> _Made:
    """LyCORIS LoKr with ``lokr_w1`` full and ``w2`` as LyCORIS' rules make it for ``rank``."""
    out_l, out_k = _factorization(layer.shape[0])
    in_m, in_n = _factorization(layer.shape[1])
    kernel = layer.kernel
    roles = {"lokr_w1": _randn(generator, out_l, in_m)}
    if rank >= max(out_k, in_n) / 2:  # too small to decompose: full w2 and scale 1
        roles["lokr_w2"] = _randn(generator, out_k, in_n, *kernel) * std
        scale, alpha = 1.0, float(rank)  # LyCORIS writes alpha = lora_dim here
    else:
        scale = 1.0 if alpha is None else alpha / rank
        if tucker:
            roles["lokr_t2"] = _randn(generator, rank, rank, *kernel) / rank
            roles["lokr_w2_a"] = _randn(generator, rank, out_k) * std / scale
            roles["lokr_w2_b"] = _randn(generator, rank, in_n)
        else:
            roles["lokr_w2_a"] = _randn(generator, out_k, rank) * std / math.sqrt(rank) / scale
            roles["lokr_w2_b"] = _randn(generator, rank, in_n * math.prod(kernel))
    s = {role: value.to(dtype) for role, value in roles.items()}
    f = {role: value.float() for role, value in s.items()}
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif tucker:
        w2 = _cores(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = (f["lokr_w2_a"] @ f["lokr_w2_b"]).reshape(out_k, in_n, *kernel)
    return _Made(s, _kron(f["lokr_w1"], w2) * scale, alpha=alpha)


def _dora(
    generator: torch.Generator,
    base: torch.Tensor,
    delta: torch.Tensor,
    kind: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, DoRAExpectation]:
    """A trained-looking magnitude: the norm of ``base + delta`` along the format's axis, +-10%."""
    axis = 1 if kind == "input" else 0
    dims = tuple(d for d in range(base.dim()) if d != axis)
    norm = torch.linalg.vector_norm(base + delta, dim=dims, keepdim=True)
    magnitude = norm * (1.0 + 0.2 * (torch.rand(norm.shape, generator=generator) - 0.5))
    if kind == "peft":  # PEFT: (out,) for Linear, (1, out, 1, 1) for Conv2d
        magnitude = magnitude.reshape(-1) if base.dim() == 2 else magnitude.reshape(1, -1, 1, 1)
    stored = magnitude.contiguous().to(dtype)
    rule: Literal["peft", "blend"] = "peft" if kind == "peft" else "blend"
    return stored, DoRAExpectation(stored.float(), axis, rule)


# --- writing ------------------------------------------------------------------------------------

_PEFT_ROLES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
_XLABS_ROLES = {"lora_down.weight": "down.weight", "lora_up.weight": "up.weight"}
_BASE_MODEL_VERSION = {
    "sd1": "sd_v1",
    "sd2": "sd_v2_v",
    "sdxl": "sdxl_base_v1-0",
    "sd3": "sd3m",
    "flux-dev": "flux1",
    "flux-schnell": "flux1",
}
_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sd3": "stable-diffusion-3-m",
    "flux-dev": "flux-1-dev",
    "flux-schnell": "flux-1-schnell",
}


def default_dtype(family: Family, fmt: TrainerFormat) -> torch.dtype:
    """The dtype each trainer saves in by default (see the module docstring)."""
    if fmt == "peft":
        return torch.float16 if family.startswith("flux") else torch.float32
    if fmt in ("peft-dora", "xlabs"):
        return torch.float32
    if fmt == "bfl" or (fmt == "kohya" and family in ("sd3", "flux-dev", "flux-schnell")):
        return torch.bfloat16
    return torch.float16


def write_trainer_lora(
    pipeline: Any,
    family: Family,
    trainer_format: TrainerFormat,
    path: Path,
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: float | None = None,
    strength: float = 0.5,
    dtype: torch.dtype | None = None,
) -> WrittenLoRA:
    """Write a ``trainer_format`` LoRA for ``pipeline`` (the tiny ``family`` model) to ``path``.

    ``rank`` is the network dim; ``alpha`` defaults to ``rank / 2`` for Kohya and LyCORIS (whose
    per-block and conv alphas derive from it) and to ``rank`` for PEFT; BFL and XLabs files have
    none (scale 1). ``strength`` sizes the differences; ``dtype`` overrides the trainer's.
    """
    if trainer_format not in FORMATS[family]:
        raise ValueError(f"no {trainer_format} files for {family}")
    kohya_like = trainer_format.startswith(("kohya", "lycoris"))
    if alpha is None:
        alpha = rank / 2 if kohya_like else float(rank)
    elif trainer_format in ("bfl", "xlabs") and alpha != rank:
        raise ValueError(f"{trainer_format} files have no alpha")
    plan = names.layer_plan(pipeline, family, trainer_format, rank, alpha)
    stored_dtype = dtype or default_dtype(family, trainer_format)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    changes: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
    doras: dict[tuple[str, str], DoRAExpectation] = {}
    for layer in plan.layers:
        made = _make(generator, layer, plan, stored_dtype, strength)
        roles = dict(made.tensors)
        if plan.style == "kohya" and made.alpha is not None:
            roles["alpha"] = torch.tensor(made.alpha).to(stored_dtype)
        if plan.dora is not None:
            (landing,) = layer.landings
            base = _weight(pipeline, landing.component, landing.module).float()
            magnitude, doras[(landing.component, landing.module)] = _dora(
                generator, base, made.delta, plan.dora, stored_dtype
            )
            roles["dora_scale" if plan.style == "kohya" else "lora_magnitude_vector"] = magnitude
        renames = {"peft": _PEFT_ROLES, "bfl": _PEFT_ROLES, "xlabs": _XLABS_ROLES}.get(
            plan.style, {}
        )
        for role, value in roles.items():
            tensors[f"{layer.name}.{renames.get(role, role)}"] = value.contiguous()
        _land(pipeline, layer, made, changes)
    metadata = _metadata(family, trainer_format, plan, rank, alpha, tensors)
    expected = {
        key: ExpectedChange(weight, bias, doras.get(key)) for key, (weight, bias) in changes.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_serialize(tensors, metadata))
    return WrittenLoRA(path, family, trainer_format, expected, metadata)


def _weight(pipeline: Any, component: str, module: str, kind: str = "weight") -> torch.Tensor:
    found = names.weight(pipeline, component, module, kind)
    assert found is not None, (component, module, kind)
    return found


def _land(
    pipeline: Any,
    layer: NamedLayer,
    made: _Made,
    changes: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]],
) -> None:
    """Add the layer's difference (and bias difference) to the modules it lands on, by rows."""
    for landing in layer.landings:
        key = (landing.component, landing.module)
        if key not in changes:
            bias = None
            if made.bias is not None:
                bias = torch.zeros(_weight(pipeline, *key, "bias").shape)
            changes[key] = (torch.zeros(_weight(pipeline, *key).shape), bias)
        weight, bias = changes[key]
        rows = landing.rows or slice(None)
        weight[landing.to_rows or slice(None)] += made.delta[rows]
        if bias is not None and made.bias is not None:
            bias[landing.to_rows or slice(None)] += made.bias[rows]


def _metadata(
    family: Family,
    fmt: TrainerFormat,
    plan: LayerPlan,
    rank: int,
    alpha: float,
    tensors: Mapping[str, torch.Tensor],
) -> dict[str, str]:
    """``__metadata__`` as each trainer writes it (sd-scripts: ``train_network.py`` and
    ``library/train_util.py``; diffusers: ``lora_base._save_lora_weights``)."""
    if plan.style == "peft":
        metadata = {"format": "pt"}
        if alpha != rank:
            packed: dict[str, Any] = {}
            for component in dict.fromkeys(layer.component for layer in plan.layers):
                targets = sorted(
                    landing.module
                    for layer in plan.layers
                    for landing in layer.landings
                    if landing.component == component
                )
                config = {
                    "r": rank,
                    "lora_alpha": alpha,
                    "target_modules": targets,
                    "use_dora": plan.dora is not None,
                    "peft_type": "LORA",
                    "bias": "none",
                    "rank_pattern": {},
                    "alpha_pattern": {},
                }
                packed |= {f"{component}.{key}": value for key, value in config.items()}
            metadata["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
        return metadata
    if plan.style != "kohya":
        return {}  # BFL and x-flux save bare state dicts
    module = {"sd3": "networks.lora_sd3", "flux-dev": "networks.lora_flux"}.get(
        family, "networks.lora"
    )
    module = "networks.lora_flux" if family == "flux-schnell" else module
    implementation = "https://github.com/Stability-AI/generative-models"
    if family.startswith("flux"):
        implementation = "https://github.com/black-forest-labs/flux"
    metadata = {
        "ss_network_module": "lycoris.kohya" if fmt.startswith("lycoris") else module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": _BASE_MODEL_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "ss_output_name": f"{family}-{fmt}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_ARCHITECTURE[family]}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": f"{family}-{fmt}",
    }
    if plan.network_args:
        metadata["ss_network_args"] = json.dumps(plan.network_args)
    return metadata | _addnet_hashes(tensors, metadata)


def _addnet_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, str]:
    """sd-scripts' ``precalculate_safetensors_hashes``: sha256 of the data after the header of
    the file holding the tensors and the ``ss_`` metadata, and the legacy 8-digit hash of
    the 64 KiB at 1 MiB (empty for a small file)."""
    payload = _serialize(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(payload[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(payload[8 + header :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(payload[0x100000:0x110000]).hexdigest()[:8],
    }


def _serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """``safetensors.torch.save`` with the metadata in sorted order: safetensors keeps it in a
    hash map whose order changes from run to run, and the same arguments must give the same
    bytes. The header keeps its length (only the order of its entries changes)."""
    payload = safetensors.torch.save(dict(tensors), dict(metadata) or None)
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length, "the header grew"
    return payload[:8] + text.ljust(length) + payload[8 + length :]
