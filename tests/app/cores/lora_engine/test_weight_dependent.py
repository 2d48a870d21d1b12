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
from safetensors.torch import save_file

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
