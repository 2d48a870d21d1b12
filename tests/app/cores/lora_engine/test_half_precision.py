"""bfloat16 models: the stacked factors are multiplied in bfloat16 straight into the weight
(one rounding), which adds no more error than storing the weights in bfloat16 does."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from app.cores.lora_engine import LoRACache, LoRARequest
from app.cores.model_manager.pipeline_manager import PipelineManager
from tests.checksums import weights_checksum
from tests.factories.lora_files import write_lora


def _unet_weights(pipeline: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in pipeline.unet.named_parameters()}


def test_bfloat16_fusion_is_as_close_as_bfloat16_storage(
    tiny_pipeline: Any, tmp_path: Path
) -> None:
    requests = [
        LoRARequest(
            id=index,
            name=f"l{index}",
            path=write_lora(tmp_path / f"l{index}.safetensors", tiny_pipeline, rank=8, seed=index),
            content_key=f"l{index}",
            weight=weight,
        )
        for index, weight in enumerate([0.7, 1.3, 0.4], start=1)
    ]
    half_pipeline = copy.deepcopy(tiny_pipeline).to(torch.bfloat16)
    full = PipelineManager(tiny_pipeline, "tiny", torch.device("cpu"), LoRACache(8, 1 << 30))
    half = PipelineManager(half_pipeline, "tiny", torch.device("cpu"), LoRACache(8, 1 << 30))
    base_full, base_half = _unet_weights(tiny_pipeline), _unet_weights(half_pipeline)
    before = weights_checksum(half_pipeline)
    with full.apply_loras(requests):
        fused_full = _unet_weights(tiny_pipeline)
    with half.apply_loras(requests):
        fused_half = _unet_weights(half_pipeline)
    changed = [name for name in fused_full if not torch.equal(fused_full[name], base_full[name])]
    assert len(changed) > 10
    for name in changed:
        storage_error = (base_half[name] - base_full[name]).abs().max().item()
        fusion_error = (fused_half[name] - fused_full[name]).abs().max().item()
        lora_effect = (fused_full[name] - base_full[name]).abs().max().item()
        assert fusion_error <= 2 * storage_error + 0.01 * lora_effect, name
    assert weights_checksum(half_pipeline) == before  # restored bit for bit
