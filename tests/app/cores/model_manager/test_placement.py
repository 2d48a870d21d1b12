"""Where a model's weights live: whole on the GPU when they fit the user's share, else
offloaded (model offload when the largest part fits, sequential otherwise), and in which
precision. The choice is a pure function of sizes, so it is checked here without a GPU; the
offload calls themselves need a CUDA device and have not run on one yet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.cores.lora_engine import LoRACache, LoRAEngine, LoRAIncompatibleError, LoRARequest
from app.cores.model_manager.model_family import ModelFamily
from app.cores.model_manager.placement import (
    WORKING_RESERVE_BYTES,
    GiB,
    Placement,
    dtype_for,
    pipeline_class,
    plan_placement,
)

CUDA = torch.device("cuda", 0)
GPU_24 = 24 * GiB


def test_the_cpu_takes_the_whole_model() -> None:
    plan = plan_placement(torch.device("cpu"), 40 * GiB, 20 * GiB, None, 0.5)
    assert plan.placement is Placement.ON_DEVICE


def test_a_model_that_fits_the_share_moves_to_the_gpu_whole() -> None:
    weights = int(GPU_24 * 0.8) - WORKING_RESERVE_BYTES
    plan = plan_placement(CUDA, weights, weights // 2, GPU_24, 0.8)
    assert plan.placement is Placement.ON_DEVICE
    assert plan.message == "Moving the model to cuda:0"


def test_too_large_for_the_share_but_each_part_fits_is_model_offload() -> None:
    # FLUX.1 dev in bfloat16: ~33 GiB of weights, the transformer ~22 GiB of them.
    plan = plan_placement(CUDA, 33 * GiB, 22 * GiB, 40 * GiB, 0.8)
    assert plan.placement is Placement.MODEL_OFFLOAD
    assert "33.0 GiB of weights do not fit the 32.0 GiB of cuda:0" in plan.message
    assert "0.8 x 40.0 GiB" in plan.message


def test_a_part_too_large_for_the_share_is_sequential_offload() -> None:
    plan = plan_placement(CUDA, 33 * GiB, 22 * GiB, GPU_24, 0.5)
    assert plan.placement is Placement.SEQUENTIAL_OFFLOAD
    assert "largest part (22.0 GiB)" in plan.message


def test_precision_per_device_and_family(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dtype_for(torch.device("cpu"), "FluxPipeline") is torch.float32
    assert dtype_for(CUDA, "StableDiffusionXLPipeline") is torch.float16
    # Whether a GPU has bfloat16 cannot be caused on a machine without one.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert dtype_for(CUDA, "FluxPipeline") is torch.bfloat16
    assert dtype_for(CUDA, "StableDiffusion3Pipeline") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert dtype_for(CUDA, "FluxPipeline") is torch.float16


def test_the_pipeline_class_is_read_from_the_folder(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert pipeline_class(tmp_path) == "FluxPipeline"
    assert pipeline_class(tmp_path / "missing") == ""


def test_loras_are_refused_while_weights_stream(tiny_pipeline: object, tmp_path: Path) -> None:
    engine = LoRAEngine(
        tiny_pipeline, ModelFamily.TINY, torch.device("cpu"), LoRACache(4, GiB),
        weights_streamed=True,
    )  # fmt: skip
    request = LoRARequest(id=1, name="style", path=tmp_path / "x.safetensors", content_key="k")
    with (
        pytest.raises(LoRAIncompatibleError, match="stream to the GPU layer by layer"),
        engine.applied([request]),
    ):
        pass
