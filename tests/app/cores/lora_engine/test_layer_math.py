"""The layer maths against each format's definition, written out literally in float64: sums
over the rank index, the Kronecker product as block assignment, the Tucker rebuild as nested
sums; no code (and no einsum/kron shortcut) is shared with ``layer_math``."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from app.cores.lora_engine.layer_math import (
    bias_delta,
    delta_size,
    dora_weight,
    layer_rank,
    weight_delta,
)
from app.cores.lora_files.layers import DoRA, DoRAAxis, DoRAStrength, FileLayer, LayerKind

CPU = torch.device("cpu")
F64 = torch.float64


def rand(seed: int, *shape: int) -> torch.Tensor:
    """Small seeded float32 tensors, as a file stores them."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def layer(kind: str, alpha: float | None = None, **tensors: torch.Tensor) -> FileLayer:
    return FileLayer(name="test.module", kind=LayerKind(kind), tensors=tensors, alpha=alpha)


# --- literal references (float64) ----------------------------------------------------------


def rank_sum(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up @ down`` as a sum over the rank index: out[o, c, *k] = sum_r up[o, r] down[r, c, *k]."""
    up, down = up.to(F64).flatten(1), down.to(F64)
    out = torch.zeros(up.shape[0], *down.shape[1:], dtype=F64)
    for r in range(down.shape[0]):
        out += up[:, r].reshape(-1, *[1] * (down.dim() - 1)) * down[r]
    return out


def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild: out[o, c, *k] = sum_i sum_j core[i, j, *k] wa[i, o] wb[j, c]."""
    core, wa, wb = core.to(F64), wa.to(F64), wb.to(F64)
    out = torch.zeros(wa.shape[1], wb.shape[1], *core.shape[2:], dtype=F64)
    for i in range(core.shape[0]):
        for j in range(core.shape[1]):
            out += torch.outer(wa[i], wb[j]).reshape(*out.shape[:2], 1, 1) * core[i, j]
    return out


def lora_tucker(up: torch.Tensor, mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """LoCon Tucker: out[o, c, *k] = sum_n sum_m up[o, n] mid[n, m, *k] down[m, c]."""
    up, mid, down = up.to(F64).flatten(1), mid.to(F64), down.to(F64).flatten(1)
    out = torch.zeros(up.shape[0], down.shape[1], *mid.shape[2:], dtype=F64)
    for n in range(mid.shape[0]):
        for m in range(mid.shape[1]):
            out += torch.outer(up[:, n], down[m]).reshape(*out.shape[:2], 1, 1) * mid[n, m]
    return out


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Block (i, j) of the Kronecker product is w1[i, j] * w2, w2 of shape (b, d, *k)."""
    w1, w2 = w1.to(F64), w2.to(F64)
    (a, c), (b, d) = w1.shape, w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:], dtype=F64)
    for i in range(a):
        for j in range(c):
            out[i * b : (i + 1) * b, j * d : (j + 1) * d] = w1[i, j] * w2
    return out


# --- the cases: (layer, module weight shape, expected difference) --------------------------

Shape = tuple[int, ...]
Built = tuple[FileLayer, Shape, torch.Tensor]
Case = Callable[[], Built]


def lora_linear() -> Built:
    up, down = rand(1, 6, 3), rand(2, 3, 5)
    return layer("lora", up=up, down=down), (6, 5), rank_sum(up, down)


def lora_linear_alpha() -> Built:
    up, down = rand(1, 6, 3), rand(2, 3, 5)
    return layer("lora", 1.5, up=up, down=down), (6, 5), rank_sum(up, down) * 1.5 / 3


def lora_conv3x3_alpha() -> Built:
    up, down = rand(1, 6, 3, 1, 1), rand(2, 3, 4, 3, 3)
    return layer("lora", 2.0, up=up, down=down), (6, 4, 3, 3), rank_sum(up, down) * 2 / 3


def lora_1x1_conv_file_for_linear() -> Built:
    up, down = rand(1, 6, 3, 1, 1), rand(2, 3, 5, 1, 1)
    return layer("lora", up=up, down=down), (6, 5), rank_sum(up, down).reshape(6, 5)


def lora_linear_file_for_1x1_conv() -> Built:
    up, down = rand(1, 6, 3), rand(2, 3, 5)
    return layer("lora", up=up, down=down), (6, 5, 1, 1), rank_sum(up, down).reshape(6, 5, 1, 1)


def lora_tucker_mid() -> Built:
    # mid is (rank of up, rank of down, kh, kw); alpha divides by down's rank (3).
    up, mid, down = rand(1, 6, 2, 1, 1), rand(2, 2, 3, 3, 3), rand(3, 3, 4, 1, 1)
    expected = lora_tucker(up, mid, down) * 1.5 / 3
    return layer("lora", 1.5, up=up, mid=mid, down=down), (6, 4, 3, 3), expected


def loha_linear() -> Built:
    w1a, w1b, w2a, w2b = rand(1, 6, 3), rand(2, 3, 5), rand(3, 6, 3), rand(4, 3, 5)
    found = layer("loha", hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b)
    return found, (6, 5), rank_sum(w1a, w1b) * rank_sum(w2a, w2b)


def loha_linear_alpha() -> Built:
    w1a, w1b, w2a, w2b = rand(1, 6, 3), rand(2, 3, 5), rand(3, 6, 3), rand(4, 3, 5)
    found = layer("loha", 1.0, hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b)
    return found, (6, 5), rank_sum(w1a, w1b) * rank_sum(w2a, w2b) / 3


def loha_conv3x3() -> Built:
    # Without Tucker cores a conv's factors are matrices over in*kh*kw.
    w1a, w1b, w2a, w2b = rand(1, 6, 2), rand(2, 2, 36), rand(3, 6, 2), rand(4, 2, 36)
    found = layer("loha", 4.0, hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b)
    expected = (rank_sum(w1a, w1b) * rank_sum(w2a, w2b) * 2).reshape(6, 4, 3, 3)
    return found, (6, 4, 3, 3), expected


def loha_tucker() -> Built:
    # Tucker factors are (rank, out) and (rank, in) mode matrices of a (rank, rank, kh, kw) core.
    t1, w1a, w1b = rand(1, 3, 3, 3, 3), rand(2, 3, 6), rand(3, 3, 4)
    t2, w2a, w2b = rand(4, 3, 3, 3, 3), rand(5, 3, 6), rand(6, 3, 4)
    roles = dict(hada_t1=t1, hada_w1_a=w1a, hada_w1_b=w1b, hada_t2=t2, hada_w2_a=w2a, hada_w2_b=w2b)
    found = layer("loha", 1.5, **roles)
    expected = tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b) * 0.5
    return found, (6, 4, 3, 3), expected


def lokr_full() -> Built:
    # Two full factors: no rank, so the scale is 1 whatever the alpha.
    w1, w2 = rand(1, 2, 3), rand(2, 4, 5)
    return layer("lokr", 7.0, lokr_w1=w1, lokr_w2=w2), (8, 15), kron(w1, w2)


def lokr_low_rank_w2() -> Built:
    w1, w2a, w2b = rand(1, 2, 3), rand(2, 4, 2), rand(3, 2, 5)
    found = layer("lokr", 1.0, lokr_w1=w1, lokr_w2_a=w2a, lokr_w2_b=w2b)
    return found, (8, 15), kron(w1, rank_sum(w2a, w2b)) / 2


def lokr_low_rank_w1() -> Built:
    w1a, w1b, w2 = rand(1, 2, 1), rand(2, 1, 3), rand(3, 4, 5)
    found = layer("lokr", 0.5, lokr_w1_a=w1a, lokr_w1_b=w1b, lokr_w2=w2)
    return found, (8, 15), kron(rank_sum(w1a, w1b), w2) * 0.5


def lokr_low_rank_both() -> Built:
    # Ranks 1 and 2: alpha divides by the right factor's rank, as A1111 and ComfyUI take it.
    w1a, w1b, w2a, w2b = rand(1, 2, 1), rand(2, 1, 3), rand(3, 4, 2), rand(4, 2, 5)
    found = layer("lokr", 1.0, lokr_w1_a=w1a, lokr_w1_b=w1b, lokr_w2_a=w2a, lokr_w2_b=w2b)
    return found, (8, 15), kron(rank_sum(w1a, w1b), rank_sum(w2a, w2b)) / 2


def lokr_conv_full_w2() -> Built:
    w1, w2 = rand(1, 2, 3), rand(2, 4, 5, 3, 3)
    return layer("lokr", lokr_w1=w1, lokr_w2=w2), (8, 15, 3, 3), kron(w1, w2)


def lokr_conv_low_rank_w2() -> Built:
    # A conv's low-rank right factor is (b, d*kh*kw): its rows are the 3x3 kernels of d inputs.
    w1, w2a, w2b = rand(1, 2, 3), rand(2, 4, 2), rand(3, 2, 45)
    found = layer("lokr", 1.0, lokr_w1=w1, lokr_w2_a=w2a, lokr_w2_b=w2b)
    expected = kron(w1, rank_sum(w2a, w2b).reshape(4, 5, 3, 3)) / 2
    return found, (8, 15, 3, 3), expected


def lokr_tucker_t2() -> Built:
    w1, t2, w2a, w2b = rand(1, 2, 3), rand(2, 2, 2, 3, 3), rand(3, 2, 4), rand(4, 2, 5)
    found = layer("lokr", 1.0, lokr_w1=w1, lokr_t2=t2, lokr_w2_a=w2a, lokr_w2_b=w2b)
    return found, (8, 15, 3, 3), kron(w1, tucker(t2, w2a, w2b)) / 2


def full_linear_with_diff_b() -> Built:
    # FULL ignores alpha: the difference is stored as it is.
    diff, diff_b = rand(1, 6, 5), rand(2, 6)
    return layer("full", 4.0, diff=diff, diff_b=diff_b), (6, 5), diff.to(F64)


def full_conv() -> Built:
    diff = rand(1, 6, 4, 3, 3)
    return layer("full", diff=diff), (6, 4, 3, 3), diff.to(F64)


def norm() -> Built:
    w_norm, b_norm = rand(1, 6), rand(2, 6)
    return layer("norm", w_norm=w_norm, b_norm=b_norm), (6,), w_norm.to(F64)


# fmt: off
CASES: list[Case] = [
    lora_linear, lora_linear_alpha, lora_conv3x3_alpha, lora_1x1_conv_file_for_linear,
    lora_linear_file_for_1x1_conv, lora_tucker_mid,
    loha_linear, loha_linear_alpha, loha_conv3x3, loha_tucker,
    lokr_full, lokr_low_rank_w2, lokr_low_rank_w1, lokr_low_rank_both, lokr_conv_full_w2,
    lokr_conv_low_rank_w2, lokr_tucker_t2,
    full_linear_with_diff_b, full_conv, norm,
]
# fmt: on
each_case = pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])


@each_case
def test_weight_delta_matches_the_formats_definition(case: Case) -> None:
    found, shape, expected = case()
    delta = weight_delta(found, shape, CPU)
    assert delta is not None
    assert delta.dtype == torch.float32
    assert delta.shape == shape
    torch.testing.assert_close(delta.to(F64), expected, rtol=1e-5, atol=1e-5)


@each_case
def test_delta_size_is_the_deltas_rows_and_columns(case: Case) -> None:
    found, shape, _ = case()
    delta = weight_delta(found, shape, CPU)
    assert delta is not None
    assert delta_size(found) == (shape[0], delta.numel() // shape[0])


def test_half_precision_files_give_float32() -> None:
    up, down = rand(1, 6, 3).half(), rand(2, 3, 5).bfloat16()
    delta = weight_delta(layer("lora", up=up, down=down), (6, 5), CPU)
    assert delta is not None
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta.to(F64), rank_sum(up, down))


@pytest.mark.parametrize(
    ("tensors", "shape", "message"),
    [
        ({"up": rand(1, 6, 3), "down": rand(2, 3, 5)}, (6, 4), "does not fit"),
        ({"up": rand(1, 6, 3), "down": rand(2, 2, 5)}, (6, 5), "do not fit"),
        ({"up": rand(1, 6, 3)}, (6, 5), "'down'"),
    ],
    ids=["shape-of-another-size", "tensors-that-do-not-fit-each-other", "missing-role"],
)
def test_malformed_layers_are_refused(
    tensors: dict[str, torch.Tensor], shape: Shape, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        weight_delta(layer("lora", None, **tensors), shape, CPU)


@pytest.mark.parametrize(
    "found",
    [layer("full", diff_b=rand(1, 6)), layer("norm", b_norm=rand(1, 6))],
    ids=["full_diff_b_only", "norm_b_norm_only"],
)
def test_a_bias_only_layer_has_no_weight_part(found: FileLayer) -> None:
    assert weight_delta(found, (6, 5), CPU) is None
    assert delta_size(found) == (6, 1)


# --- bias --------------------------------------------------------------------------------


BIAS = rand(9, 6)


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        # PEFT's lora_B.bias sits inside the branch scaled by alpha / rank.
        (layer("lora", 1.5, up=rand(1, 6, 3), down=rand(2, 3, 5), bias=BIAS), BIAS / 2),
        (layer("full", 3.0, diff=rand(1, 6, 5), diff_b=BIAS), BIAS),
        (layer("norm", 3.0, w_norm=rand(1, 6), b_norm=BIAS), BIAS),
        (lora_linear()[0], None),
        (loha_linear()[0], None),
        (lokr_full()[0], None),
        (full_conv()[0], None),
    ],
    ids=["lora", "full", "norm", "lora-no-bias", "loha", "lokr", "full-no-diff_b"],
)
def test_bias_delta(found: FileLayer, expected: torch.Tensor | None) -> None:
    torch.testing.assert_close(bias_delta(found, CPU), expected)  # float32 checked too


# --- rank --------------------------------------------------------------------------------


# fmt: off
RANKS: list[tuple[Case, int | None]] = [
    (lora_linear, 3), (lora_tucker_mid, 3), (loha_linear, 3), (loha_tucker, 3),
    (lokr_low_rank_w2, 2), (lokr_low_rank_w1, 1), (lokr_low_rank_both, 2),
    (lokr_tucker_t2, 2), (lokr_full, None), (full_conv, None), (norm, None),
]
# fmt: on


@pytest.mark.parametrize(
    ("case", "rank"), RANKS, ids=[f"{case.__name__}-{rank}" for case, rank in RANKS]
)
def test_layer_rank(case: Case, rank: int | None) -> None:
    assert layer_rank(case()[0]) == rank


# --- DoRA --------------------------------------------------------------------------------

EPS = torch.finfo(torch.float32).eps


def dora_reference(
    weight: torch.Tensor, delta: torch.Tensor, dora: DoRA, strength: float
) -> torch.Tensor:
    """Row by row (OUTPUT) or column by column (INPUT), each norm summed out by hand. BLEND:
    W + s * (m * (W + d) / (||W + d|| + eps) - W); INSIDE: m * (W + s*d) / ||W + s*d||."""
    weight, delta, m = weight.to(F64), delta.to(F64), dora.magnitude.to(F64).flatten()
    blend = dora.strength is DoRAStrength.BLEND
    merged = weight + delta if blend else weight + strength * delta
    out = torch.empty_like(weight)
    axis = 0 if dora.axis is DoRAAxis.OUTPUT else 1
    for index in range(weight.shape[axis]):
        part = merged.select(axis, index)
        norm = math.sqrt(float((part * part).sum())) + (EPS if blend else 0.0)
        decomposed = m[index] * part / norm
        base = weight.select(axis, index)
        new = base + strength * (decomposed - base) if blend else decomposed
        out.select(axis, index).copy_(new)
    return out


def magnitude(seed: int, shape: Shape) -> torch.Tensor:
    return rand(seed, *shape).abs() + 0.5


OUT, IN, BLEND, INSIDE = DoRAAxis.OUTPUT, DoRAAxis.INPUT, DoRAStrength.BLEND, DoRAStrength.INSIDE
# (axis, convention, weight shape, magnitude as the file stores it)
DORA_KINDS = [
    pytest.param(OUT, BLEND, (6, 5), (6, 1), id="lycoris-out-linear"),
    pytest.param(OUT, BLEND, (6, 4, 3, 3), (6, 1, 1, 1), id="lycoris-out-conv"),
    pytest.param(IN, BLEND, (6, 5), (1, 5), id="kohya-in-linear"),
    pytest.param(IN, BLEND, (6, 4, 3, 3), (1, 4, 1, 1), id="kohya-in-conv"),
    pytest.param(OUT, INSIDE, (6, 5), (6,), id="peft-linear"),
    pytest.param(OUT, INSIDE, (6, 4, 3, 3), (1, 6, 1, 1), id="peft-conv"),
]


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.0])
@pytest.mark.parametrize(("axis", "rule", "shape", "m_shape"), DORA_KINDS)
def test_dora_weight_matches_the_definition(
    axis: DoRAAxis, rule: DoRAStrength, shape: Shape, m_shape: Shape, strength: float
) -> None:
    weight, delta = rand(1, *shape), rand(2, *shape) * 0.3
    dora = DoRA(magnitude(3, m_shape), axis, rule)
    new = dora_weight(weight, delta, dora, strength)
    assert new.dtype == torch.float32
    assert new.shape == shape
    expected = dora_reference(weight, delta, dora, strength)
    torch.testing.assert_close(new.to(F64), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [DoRAAxis.OUTPUT, DoRAAxis.INPUT])
def test_blend_at_strength_zero_gives_the_base_weight_back(axis: DoRAAxis) -> None:
    weight, delta = rand(1, 6, 5), rand(2, 6, 5)
    m = magnitude(3, (6, 1) if axis is DoRAAxis.OUTPUT else (1, 5))
    new = dora_weight(weight, delta, DoRA(m, axis, DoRAStrength.BLEND), 0.0)
    assert torch.equal(new, weight)


@pytest.mark.parametrize("convention", [DoRAStrength.BLEND, DoRAStrength.INSIDE])
def test_output_rows_take_the_magnitude_as_their_norm(convention: DoRAStrength) -> None:
    # The norm is of W + delta (LyCORIS, PEFT), not of W alone (ComfyUI's output axis).
    weight, delta = rand(1, 6, 4, 3, 3), rand(2, 6, 4, 3, 3)
    m = magnitude(3, (6,))
    new = dora_weight(weight, delta, DoRA(m, DoRAAxis.OUTPUT, convention), 1.0)
    torch.testing.assert_close(new.flatten(1).norm(dim=1), m)


def test_dora_differs_from_the_plain_delta() -> None:
    weight, delta = rand(1, 6, 5), rand(2, 6, 5)
    dora = DoRA(magnitude(3, (6, 1)), DoRAAxis.OUTPUT, DoRAStrength.BLEND)
    assert not torch.allclose(dora_weight(weight, delta, dora, 1.0), weight + delta)


def test_a_magnitude_of_the_wrong_size_is_refused() -> None:
    dora = DoRA(magnitude(3, (5, 1)), DoRAAxis.OUTPUT, DoRAStrength.BLEND)
    with pytest.raises(ValueError, match="magnitudes"):
        dora_weight(rand(1, 6, 5), rand(2, 6, 5), dora, 1.0)
