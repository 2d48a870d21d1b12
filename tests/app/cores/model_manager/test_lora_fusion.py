"""The fast LoRA path against diffusers' own (Plan 006) path, on real files and the real
tiny pipeline: same images within float tolerance, exact restore, bounded cache."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from app.cores.model_manager.lora_fusion import HarvestCache
from app.cores.model_manager.pipeline_manager import AdapterSpec, PipelineManager
from tests.checksums import weights_checksum
from tests.factories.lora_files import write_lora

# Fused weights are summed in another order than unfused adapter outputs: images (0..1)
# agree to float rounding, measured up to 2e-4 with five LoRAs at weights up to 2; one 8-bit
# pixel level is 1/255 = 3.9e-3.
FUSED_TOLERANCE = 1e-3


def render(manager: PipelineManager, adapters: list[AdapterSpec] | None = None) -> np.ndarray:
    with manager.loras_applied(adapters or []):
        result = manager.pipeline(
            "a red fox",
            negative_prompt="",
            num_inference_steps=3,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(11),
            output_type="np",
        )
    images: np.ndarray = result.images
    return images


def manager(pipeline: Any, max_count: int = 16, max_bytes: int = 1 << 30) -> PipelineManager:
    return PipelineManager(
        pipeline, "tiny", torch.device("cpu"), HarvestCache(max_count, max_bytes)
    )


def spec(path: Path, weight: float = 1.0, index: int = 1) -> AdapterSpec:
    return AdapterSpec(f"lora_{index}", path.stem, str(path), weight, cache_key=path.stem)


@pytest.fixture
def files(tmp_path: Path, tiny_pipeline: StableDiffusionPipeline) -> dict[str, Path]:
    def make(name: str, **options: Any) -> Path:
        return write_lora(tmp_path / f"{name}.safetensors", tiny_pipeline, **options)

    return {
        "kohya_half_alpha": make(
            "kohya_half_alpha",
            fmt="kohya",
            components=("unet", "text_encoder"),
            rank=8,
            alpha=4.0,
            seed=1,
        ),
        "peft_unet": make("peft_unet", fmt="peft", rank=4, seed=2),
        "peft_full": make("peft_full", fmt="peft", components=("unet", "text_encoder"), seed=3),
        "locon": make("locon", fmt="kohya", include_conv=True, seed=4),
        "kohya_unet": make("kohya_unet", fmt="kohya", rank=16, seed=5),
    }


@pytest.mark.parametrize("name", ["kohya_half_alpha", "peft_unet", "peft_full", "locon"])
def test_fused_matches_diffusers_adapters(
    tiny_pipeline: StableDiffusionPipeline, files: dict[str, Path], name: str
) -> None:
    fast, plan = manager(tiny_pipeline), manager(tiny_pipeline, max_count=0)
    adapters = [spec(files[name], 0.8)]
    fused_image, unfused_image = render(fast, adapters), render(plan, adapters)
    assert np.abs(fused_image - unfused_image).max() < FUSED_TOLERANCE
    assert np.abs(fused_image - render(fast)).max() > 0.01  # the LoRA did something


def test_five_weighted_loras_match_diffusers_adapters(
    tiny_pipeline: StableDiffusionPipeline, files: dict[str, Path]
) -> None:
    adapters = [
        spec(path, weight, index)
        for index, (path, weight) in enumerate(
            zip(files.values(), [0.3, 1.0, 1.7, 0.55, 2.0], strict=True), start=1
        )
    ]
    fast, plan = manager(tiny_pipeline), manager(tiny_pipeline, max_count=0)
    assert np.abs(render(fast, adapters) - render(plan, adapters)).max() < FUSED_TOLERANCE


def test_weights_are_restored_bit_for_bit(
    tiny_pipeline: StableDiffusionPipeline, files: dict[str, Path]
) -> None:
    fast = manager(tiny_pipeline)
    before, base = weights_checksum(fast.pipeline), render(fast)
    for _ in range(3):
        render(fast, [spec(path, 1.3, i) for i, path in enumerate(files.values())])
        assert weights_checksum(fast.pipeline) == before
    assert np.array_equal(render(fast), base)


def test_weights_are_restored_when_the_generation_raises(
    tiny_pipeline: StableDiffusionPipeline, files: dict[str, Path]
) -> None:
    fast = manager(tiny_pipeline)
    before = weights_checksum(fast.pipeline)
    inside: list[str] = []

    def fail_while_fused() -> None:
        with fast.loras_applied([spec(files["peft_full"]), spec(files["locon"], index=2)]):
            inside.append(weights_checksum(fast.pipeline))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_while_fused()
    assert inside[0] != before  # really fused while inside
    assert weights_checksum(fast.pipeline) == before


def test_weight_zero_everywhere_gives_the_base_image(
    tiny_pipeline: StableDiffusionPipeline, files: dict[str, Path]
) -> None:
    fast = manager(tiny_pipeline)
    base = render(fast)
    assert np.array_equal(render(fast, [spec(files["peft_full"], 0.0)]), base)


def test_no_cross_talk_between_requests(
    tiny_pipeline: StableDiffusionPipeline,
    embedded_model_dir: Path,
    files: dict[str, Path],
) -> None:
    fast = manager(tiny_pipeline)
    render(fast, [spec(files["kohya_half_alpha"], 2.0), spec(files["locon"], 1.0, 2)])
    after_other = render(fast, [spec(files["peft_unet"], 0.9, 3)])
    fresh = manager(
        StableDiffusionPipeline.from_pretrained(str(embedded_model_dir), local_files_only=True)
    )
    assert np.array_equal(after_other, render(fresh, [spec(files["peft_unet"], 0.9, 3)]))


def test_cache_keeps_the_most_recently_used_within_its_count(
    tiny_pipeline: StableDiffusionPipeline, files: dict[str, Path]
) -> None:
    fast = manager(tiny_pipeline, max_count=2)
    a, b, c = files["peft_unet"], files["kohya_unet"], files["locon"]
    for path in (a, b, a, c):
        render(fast, [spec(path)])
    assert fast.lora_cache.keys() == ["peft_unet", "locon"]


def test_cache_never_evicts_what_the_request_uses(
    tiny_pipeline: StableDiffusionPipeline, files: dict[str, Path]
) -> None:
    fast = manager(tiny_pipeline, max_bytes=1)  # everything is over budget
    adapters = [spec(files["peft_unet"]), spec(files["kohya_unet"], index=2)]
    fused_image = render(fast, adapters)
    assert set(fast.lora_cache.keys()) == {"peft_unet", "kohya_unet"}
    render(fast, [spec(files["locon"], index=3)])
    assert fast.lora_cache.keys() == ["locon"]
    assert np.array_equal(render(fast, adapters), fused_image)


def test_a_warm_lora_is_not_loaded_through_diffusers_again(
    tiny_pipeline: StableDiffusionPipeline,
    files: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fast = manager(tiny_pipeline)
    render(fast, [spec(files["peft_full"])])
    loads = 0
    original = tiny_pipeline.load_lora_weights

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        nonlocal loads
        loads += 1
        return original(*args, **kwargs)

    tiny_pipeline.load_lora_weights = counting_load  # counts calls; the real loader runs
    render(fast, [spec(files["peft_full"])])
    assert loads == 0
    fast.lora_cache.discard("peft_full")  # as when the LoRA is deleted
    render(fast, [spec(files["peft_full"])])
    assert loads == 1


def test_cache_disabled_is_plan_006_load_and_unload(
    tiny_pipeline: StableDiffusionPipeline,
    files: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    plan = manager(tiny_pipeline, max_count=0)
    before = weights_checksum(plan.pipeline)
    with caplog.at_level(logging.INFO, logger="app.cores.model_manager.pipeline_manager"):
        render(plan, [spec(files["kohya_unet"], 0.5)])
    assert "'kohya_unet' as lora_1 (weight 0.5)" in caplog.text
    assert "Unloaded all LoRAs" in caplog.text
    assert plan.lora_cache.keys() == []
    assert weights_checksum(plan.pipeline) == before


def test_dora_falls_back_to_unfused_adapters(
    tiny_pipeline: StableDiffusionPipeline, tmp_path: Path
) -> None:
    dora = write_lora(tmp_path / "dora.safetensors", tiny_pipeline, fmt="peft", dora=True, seed=9)
    fast, plan = manager(tiny_pipeline), manager(tiny_pipeline, max_count=0)
    before = weights_checksum(fast.pipeline)
    assert np.array_equal(render(fast, [spec(dora)]), render(plan, [spec(dora)]))
    assert fast.lora_cache.keys() == []
    assert weights_checksum(fast.pipeline) == before
