"""What makes the restore exact: the base weights kept (swapped out on the CPU, copied to
host memory elsewhere) in reused buffers and put back bit for bit."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline

from app.cores.lora_engine import LoRACache, LoRARequest, fusion
from app.cores.lora_engine.backups import BackupPool
from app.cores.model_manager.pipeline_manager import PipelineManager
from tests.checksums import weights_checksum
from tests.factories.lora_files import write_lora


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "copy"])
def test_a_restore_puts_back_every_changed_tensor_exactly(swap: bool) -> None:
    pool = BackupPool(swap=swap)
    weight = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    original = weight.detach().clone()
    current, target = pool.writable(weight)
    # A change smaller than most values' ulp, then a large one: both undone exactly.
    torch.add(current, torch.full_like(current, 1e-7), out=target)
    target.mul_(3)
    assert torch.equal(weight.detach(), target)
    assert not torch.equal(weight.detach(), original)
    pool.restore()
    assert torch.equal(weight.detach(), original)
    assert pool.saved == 0


def test_swapping_never_writes_the_original_weight() -> None:
    pool = BackupPool(swap=True)
    weight = torch.nn.Parameter(torch.ones(4, 4))
    storage = weight.data_ptr()
    current, target = pool.writable(weight)
    assert current.data_ptr() == storage
    assert target.data_ptr() != storage
    assert weight.data_ptr() == target.data_ptr()
    target.fill_(5)
    assert torch.equal(current, torch.ones(4, 4))
    pool.restore()
    assert weight.data_ptr() == storage


def test_the_model_uses_the_changed_weight_until_the_restore() -> None:
    linear = torch.nn.Linear(3, 2, bias=False)
    pool = BackupPool(swap=True)
    x = torch.ones(1, 3)
    before = linear(x)
    current, target = pool.writable(linear.weight)
    torch.mul(current, 2, out=target)
    assert torch.allclose(linear(x), 2 * before)
    pool.restore()
    assert torch.equal(linear(x), before)


def test_buffers_are_reused_by_the_next_request(
    tiny_pipeline: StableDiffusionPipeline, tmp_path: Path
) -> None:
    manager = PipelineManager(tiny_pipeline, "tiny", torch.device("cpu"), LoRACache(4, 1 << 30))
    path = write_lora(tmp_path / "l.safetensors", tiny_pipeline, include_conv=True)
    request = LoRARequest(id=1, name="l", path=path, content_key="l")
    before = weights_checksum(tiny_pipeline)
    pool = manager.loras.backups
    assert pool.swap  # a CPU pipeline, not offloaded
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


class FusedModules:
    """Counts the modules fusion computes; the real function still runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = fusion._fuse_module

        def counting(*args: Any, **kwargs: Any) -> None:
            self.count += 1
            real(*args, **kwargs)

        monkeypatch.setattr(fusion, "_fuse_module", counting)


def _fused_checksum(manager: PipelineManager, requests: list[LoRARequest]) -> str:
    with manager.apply_loras(requests):
        return weights_checksum(manager.pipeline)


def test_the_same_set_again_reuses_the_fused_weights(
    tiny_pipeline: StableDiffusionPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = PipelineManager(tiny_pipeline, "tiny", torch.device("cpu"), LoRACache(4, 1 << 30))
    paths = [write_lora(tmp_path / f"{i}.safetensors", tiny_pipeline, seed=i) for i in (1, 2)]
    requests = [
        LoRARequest(id=i, name=str(i), path=path, content_key=str(i), weight=0.5)
        for i, path in enumerate(paths, start=1)
    ]
    base = weights_checksum(tiny_pipeline)
    fused = FusedModules(monkeypatch)
    first = _fused_checksum(manager, requests)
    computed = fused.count
    assert computed > 0
    assert _fused_checksum(manager, requests) == first
    assert fused.count == computed  # nothing computed: the kept buffers were put back
    assert weights_checksum(tiny_pipeline) == base


def test_another_weight_or_order_is_fused_again(
    tiny_pipeline: StableDiffusionPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = PipelineManager(tiny_pipeline, "tiny", torch.device("cpu"), LoRACache(4, 1 << 30))
    path = write_lora(
        tmp_path / "l.safetensors", tiny_pipeline, components=("unet", "text_encoder")
    )
    half = [LoRARequest(id=1, name="l", path=path, content_key="l", weight=0.5)]
    more = [replace(half[0], weight=0.6)]
    text_only = [replace(half[0], unet_weight=0.0)]
    checksums = {name: _fused_checksum(manager, r) for name, r in [("half", half), ("more", more)]}
    fresh = PipelineManager(
        copy.deepcopy(tiny_pipeline), "tiny", torch.device("cpu"), LoRACache(4, 1 << 30)
    )
    fused = FusedModules(monkeypatch)
    for name, requests in [("half", half), ("more", more), ("half", half)]:
        before = fused.count
        assert _fused_checksum(manager, requests) == checksums[name]
        assert fused.count > before
    base = weights_checksum(tiny_pipeline)
    assert _fused_checksum(manager, text_only) == _fused_checksum(fresh, text_only) != base


def test_a_replaced_parameter_is_fused_again_not_skipped(
    tiny_pipeline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = PipelineManager(tiny_pipeline, "tiny", torch.device("cpu"), LoRACache(4, 1 << 30))
    path = write_lora(tmp_path / "l.safetensors", tiny_pipeline)
    requests = [LoRARequest(id=1, name="l", path=path, content_key="l")]
    first = _fused_checksum(manager, requests)
    # Something outside the engine gives a changed layer a new parameter (same values).
    layer = tiny_pipeline.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    fused = FusedModules(monkeypatch)
    assert _fused_checksum(manager, requests) == first
    assert fused.count > 0  # fused again: the kept buffer belongs to the old parameter
