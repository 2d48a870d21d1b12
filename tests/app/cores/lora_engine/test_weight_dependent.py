"""The weight-dependent network types ((IA)³, GLoRA, OFT) as LyCORIS defines them.

Each file uses LyCORIS's own key names at the tiny embedded model's shapes (Kohya module
names). Inside ``PipelineManager.apply_loras`` the module's weight equals a reference the test
computes by the most literal formula (loops, explicit block assembly, float64); every other
weight is untouched; afterwards every weight is bit-identical; strength 0 leaves the base
weight; the upload check accepts the file with the right network type.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.cores.lora_engine import LoRACache, LoRAIncompatibleError, LoRARequest
from app.cores.lora_files.inspection import inspect_lora_header
from app.cores.lora_files.safetensors_file import read_header
from app.cores.model_manager.pipeline_manager import PipelineManager

_BLOCK = "down_blocks_0_attentions_0_transformer_blocks_0"
# Kohya name -> diffusers module in the tiny model (to_q 32x32, ff.net.2 32x128, conv1 32x32x3x3).
Q = (f"lora_unet_{_BLOCK}_attn1_to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
FF_OUT = (
    f"lora_unet_{_BLOCK}_ff_net_2",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
)
CONV = ("lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1")
STRENGTH = 0.7

Reference = Callable[[torch.Tensor, float], torch.Tensor]
"""(base weight in float64, strength) -> the expected new weight (float64)."""


def _snapshot(pipeline: Any) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{name}": tensor.detach().clone()
        for part in ("unet", "text_encoder")
        for name, tensor in getattr(pipeline, part).state_dict().items()
    }


def _apply(
    pipeline: Any, path: Path, module: str, strength: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The module's weight inside the block, every weight inside, every weight after."""
    manager = PipelineManager(
        pipeline, "tiny", torch.device("cpu"), lora_cache=LoRACache(4, 1 << 30)
    )
    request = LoRARequest(id=1, name="x", path=path, content_key="k", weight=strength)
    with manager.apply_loras([request]):
        inside = _snapshot(pipeline)
        changed = pipeline.unet.get_submodule(module).weight.detach().clone()
    return changed, inside, _snapshot(pipeline)


def _check(pipeline: Any, path: Path, module: str, reference: Reference, network_type: str) -> None:
    before = _snapshot(pipeline)
    key = f"unet.{module}.weight"
    for strength in (STRENGTH, 0.0):
        changed, inside, after = _apply(pipeline, path, module, strength)
        expected = reference(before[key].double(), strength)
        assert torch.allclose(changed.double(), expected, rtol=1e-5, atol=1e-6), (
            (changed.double() - expected).abs().max()
        )
        if strength == 0.0:
            assert torch.equal(changed, before[key])
        else:
            assert not torch.equal(changed, before[key])
        for name, tensor in inside.items():
            if name != key:
                assert torch.equal(tensor, before[name]), name
        for name, tensor in after.items():
            assert torch.equal(tensor, before[name]), name
    assert inspect_lora_header(read_header(path)).network_type == network_type


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


# (IA)³ ------------------------------------------------------------------------------------


def _ia3_reference(factors: torch.Tensor, on_input: bool) -> Reference:
    """LyCORIS IA3Module: every element of W times (1 + s * w) of its row (output) or of its
    input channel (``on_input``)."""

    def reference(base: torch.Tensor, strength: float) -> torch.Tensor:
        w = factors.double().flatten()
        out = base.clone()
        for row in range(base.shape[0]):
            for column in range(base.shape[1]):
                factor = w[column] if on_input else w[row]
                out[row, column] = base[row, column] * (1 + strength * factor)
        return out

    return reference


@pytest.mark.parametrize(
    ("target", "shape", "on_input"),
    [
        pytest.param(Q, (32,), False, id="linear-output"),
        pytest.param(FF_OUT, (128,), True, id="linear-input"),
        pytest.param(CONV, (1, 32, 1, 1), False, id="conv-output"),
        pytest.param(CONV, (1, 32, 1, 1), True, id="conv-input"),
    ],
)
def test_ia3(
    tiny_pipeline: Any,
    tmp_path: Path,
    target: tuple[str, str],
    shape: tuple[int, ...],
    on_input: bool,
) -> None:
    name, module = target
    factors = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.5
    path = _save(
        tmp_path / "ia3.safetensors",
        {f"{name}.weight": factors, f"{name}.on_input": torch.tensor(int(on_input))},
    )
    _check(tiny_pipeline, path, module, _ia3_reference(factors, on_input), "ia3")


def test_ia3_on_the_wrong_axis_is_refused(tiny_pipeline: Any, tmp_path: Path) -> None:
    name, _module = FF_OUT
    path = _save(
        tmp_path / "ia3.safetensors",
        {f"{name}.weight": torch.ones(128), f"{name}.on_input": torch.tensor(0)},
    )
    manager = PipelineManager(
        tiny_pipeline, "tiny", torch.device("cpu"), lora_cache=LoRACache(4, 1 << 30)
    )
    request = LoRARequest(id=1, name="x", path=path, content_key="k", weight=1.0)
    with (
        pytest.raises(LoRAIncompatibleError, match="scales 128 output rows"),
        manager.apply_loras([request]),
    ):
        pass


# GLoRA ------------------------------------------------------------------------------------


def _glora_new_reference(t: dict[str, torch.Tensor], alpha: float, rank: int) -> Reference:
    """LyCORIS GLoRAModule (today's layout): W + s * alpha/r * (W A + B), where A maps the
    input channels (a1 (in, r) @ a2 (r, in)) at every kernel position and B = b1 @ b2."""

    def reference(base: torch.Tensor, strength: float) -> torch.Tensor:
        a1, a2, b1 = (t[k].double().flatten(1) for k in ("a1", "a2", "b1"))
        b2 = t["b2"].double().reshape(rank, base.shape[1], -1)
        flat = base.reshape(base.shape[0], base.shape[1], -1)
        out = torch.empty_like(flat)
        for position in range(flat.shape[2]):
            w = flat[:, :, position]
            diff = w @ a1 @ a2 + b1 @ b2[:, :, position]
            out[:, :, position] = w + strength * alpha / rank * diff
        return out.reshape(base.shape)

    return reference


def _glora_old_reference(t: dict[str, torch.Tensor], alpha: float, rank: int) -> Reference:
    """The first LyCORIS layout (A1111's only one): W + s * alpha/r * (b2 @ b1 + W @ a2 @ a1)."""

    def reference(base: torch.Tensor, strength: float) -> torch.Tensor:
        a1, a2, b1, b2 = (t[k].double() for k in ("a1", "a2", "b1", "b2"))
        return base + strength * alpha / rank * (b2 @ b1 + base @ a2 @ a1)

    return reference


def _glora_file(path: Path, name: str, shapes: dict[str, tuple[int, ...]], alpha: float) -> Path:
    generator = torch.Generator().manual_seed(2)
    tensors = {
        role: torch.randn(shape, generator=generator) * 0.1 for role, shape in shapes.items()
    }
    _save(
        path,
        {
            **{f"{name}.{role}.weight": v for role, v in tensors.items()},
            f"{name}.alpha": torch.tensor(alpha),
        },
    )
    return path


@pytest.mark.parametrize(
    ("target", "shapes", "old"),
    [
        pytest.param(
            Q, {"a1": (32, 4), "a2": (4, 32), "b1": (32, 4), "b2": (4, 32)}, False, id="linear"
        ),
        pytest.param(
            CONV,
            {"a1": (32, 4, 1, 1), "a2": (4, 32, 1, 1), "b1": (32, 4, 1, 1), "b2": (4, 32, 3, 3)},
            False,
            id="conv",
        ),
        pytest.param(
            FF_OUT,
            {"a1": (4, 128), "a2": (128, 4), "b1": (4, 128), "b2": (32, 4)},
            True,
            id="old-layout",
        ),
        pytest.param(
            Q, {"a1": (4, 32), "a2": (32, 4), "b1": (4, 32), "b2": (32, 4)}, True, id="old-square"
        ),
    ],
)
def test_glora(
    tiny_pipeline: Any,
    tmp_path: Path,
    target: tuple[str, str],
    shapes: dict[str, tuple[int, ...]],
    old: bool,
) -> None:
    name, module = target
    path = _glora_file(tmp_path / "glora.safetensors", name, shapes, alpha=2.0)

    stored = {
        k.rsplit(".", 2)[1]: v for k, v in load_file(str(path)).items() if k.endswith(".weight")
    }
    reference = (_glora_old_reference if old else _glora_new_reference)(stored, 2.0, 4)
    _check(tiny_pipeline, path, module, reference, "glora")


# OFT ----------------------------------------------------------------------------------------


def _oft_reference(blocks: torch.Tensor, alpha: float | None) -> Reference:
    """LyCORIS diag-OFT, literally: per block Q = B - B^T (the whole set scaled down to norm
    alpha * rows when longer), R = (I + Q) (I - Q)^-1, blended with I by the strength, and
    the block's rows of W replaced by R^T @ rows."""

    def expected(weight: torch.Tensor, strength: float) -> torch.Tensor:
        count, size = blocks.shape[0], blocks.shape[1]
        skew = blocks.double() - blocks.double().transpose(1, 2)
        if alpha:
            limit = alpha * weight.shape[0]
            norm = float(torch.sqrt((skew**2).sum()))
            if norm + 1e-8 > limit:
                skew = skew * (limit / (norm + 1e-8))
        result = weight.clone()
        eye = torch.eye(size, dtype=torch.float64)
        for k in range(count):
            rotation = (eye + skew[k]) @ torch.linalg.inv(eye - skew[k])
            blended = strength * rotation + (1 - strength) * eye
            rows = weight[k * size : (k + 1) * size].reshape(size, -1)
            result[k * size : (k + 1) * size] = (blended.T @ rows).reshape(
                weight[k * size : (k + 1) * size].shape
            )
        return result

    return expected


@pytest.mark.parametrize(
    ("target", "role", "alpha"),
    [
        (Q, "oft_blocks", 0.01),  # alpha * 32 rows is below the blocks' norm: scaled down
        (Q, "oft_blocks", None),
        (CONV, "oft_blocks", 1e-3),
        (Q, "oft_diag", None),  # older files: never constrained
    ],
    ids=["linear-constrained", "linear", "conv-constrained", "oft-diag"],
)
def test_oft(
    tiny_pipeline: Any, tmp_path: Path, target: tuple[str, str], role: str, alpha: float | None
) -> None:
    name, module = target
    blocks = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.05
    tensors = {f"{name}.{role}": blocks}
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    path = _save(tmp_path / "oft.safetensors", tensors)
    constrained = alpha if role == "oft_blocks" else None
    _check(tiny_pipeline, path, module, _oft_reference(blocks, constrained), "oft")
