"""The copies that make the restore exact: kept in reused host buffers, put back bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from app.cores.lora_engine import LoRACache, LoRARequest
from app.cores.lora_engine.backups import BackupPool
from app.cores.model_manager.pipeline_manager import PipelineManager
from tests.checksums import weights_checksum
from tests.factories.lora_files import write_lora


def test_a_restore_puts_back_every_saved_tensor_exactly() -> None:
    pool = BackupPool()
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    original = weight.clone()
    pool.save(weight)
    weight.add_(torch.full_like(weight, 1e-7))  # a change smaller than most values' ulp
    weight.mul_(3)
    pool.restore()
    assert torch.equal(weight, original)
    assert pool.saved == 0


def test_buffers_are_reused_by_the_next_request(
    tiny_pipeline: StableDiffusionPipeline, tmp_path: Path
) -> None:
    manager = PipelineManager(tiny_pipeline, "tiny", torch.device("cpu"), LoRACache(4, 1 << 30))
    path = write_lora(tmp_path / "l.safetensors", tiny_pipeline, include_conv=True)
    request = LoRARequest(id=1, name="l", path=path, content_key="l")
    before = weights_checksum(tiny_pipeline)
    pool = manager.loras.backups
    with manager.apply_loras([request]):
        assert weights_checksum(tiny_pipeline) != before
    held = pool.nbytes
    buffers = {id(buffer) for buffer in pool._buffers.values()}
    assert held > 0
    with manager.apply_loras([request]):
        pass
    assert pool.nbytes == held
    assert {id(buffer) for buffer in pool._buffers.values()} == buffers
    assert weights_checksum(tiny_pipeline) == before
    manager.close()
    assert pool.nbytes == 0
