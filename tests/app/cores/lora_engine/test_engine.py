"""The engine's fusion against diffusers' own (Plan 006) path, on real files and the real
tiny pipeline: same images within float tolerance, exact restore, bounded cache."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from app.cores.lora_engine import LoRACache, LoRAIncompatibleError, LoRARequest
from app.cores.model_manager.pipeline_manager import PipelineManager
from tests.checksums import weights_checksum
from tests.factories.lora_files import lora_targets, write_lora

# Fused weights are summed in another order than unfused adapter outputs: images (0..1)
# agree to float rounding, measured up to 2e-4 with five LoRAs at weights up to 2; one 8-bit
# pixel level is 1/255 = 3.9e-3.
FUSED_TOLERANCE = 1e-3

ENGINE_LOGGER = "app.cores.lora_engine.engine"


def draw(pipeline: Any) -> np.ndarray:
    result = pipeline(
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


def render(manager: PipelineManager, requests: list[LoRARequest] | None = None) -> np.ndarray:
    with manager.apply_loras(requests or []):
        return draw(manager.pipeline)


def manager(pipeline: Any, max_count: int = 16, max_bytes: int = 1 << 30) -> PipelineManager:
    return PipelineManager(
        pipeline, "tiny", torch.device("cpu"), lora_cache=LoRACache(max_count, max_bytes)
    )


def request(path: Path, weight: float = 1.0, index: int = 1) -> LoRARequest:
    return LoRARequest(id=index, name=path.stem, path=path, content_key=path.stem, weight=weight)


class LoadCounter:
    """Counts ``load_lora_weights`` calls on a pipeline; the real loader still runs."""

    def __init__(self, pipeline: Any) -> None:
        self.calls = 0
        original = pipeline.load_lora_weights

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        pipeline.load_lora_weights = counting


# Pipelines are typed ``Any``: diffusers leaves most of a pipeline's attributes (its components,
# the LoRA loader's methods, ``__call__``) unannotated.
@pytest.fixture
def files(tmp_path: Path, tiny_pipeline: Any) -> dict[str, Path]:
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
    tiny_pipeline: Any, files: dict[str, Path], name: str
) -> None:
    fast, plan = manager(tiny_pipeline), manager(tiny_pipeline, max_count=0)
    requests = [request(files[name], 0.8)]
    loads = LoadCounter(tiny_pipeline)
    fused_image = render(fast, requests)
    assert loads.calls == 0  # the engine fused it itself
    unfused_image = render(plan, requests)
    assert loads.calls == 1  # Plan 006: loaded through diffusers
    assert np.abs(fused_image - unfused_image).max() < FUSED_TOLERANCE
    assert np.abs(fused_image - render(fast)).max() > 0.01  # the LoRA did something


def test_five_weighted_loras_match_diffusers_adapters(
    tiny_pipeline: Any, files: dict[str, Path]
) -> None:
    requests = [
        request(path, weight, index)
        for index, (path, weight) in enumerate(
            zip(files.values(), [0.3, 1.0, 1.7, 0.55, 2.0], strict=True), start=1
        )
    ]
    fast, plan = manager(tiny_pipeline), manager(tiny_pipeline, max_count=0)
    loads = LoadCounter(tiny_pipeline)
    fused_image = render(fast, requests)
    assert loads.calls == 0
    assert np.abs(fused_image - render(plan, requests)).max() < FUSED_TOLERANCE
    assert loads.calls == 5


def test_weights_are_restored_bit_for_bit(tiny_pipeline: Any, files: dict[str, Path]) -> None:
    fast = manager(tiny_pipeline)
    before, base = weights_checksum(fast.pipeline), render(fast)
    for _ in range(3):
        render(fast, [request(path, 1.3, i) for i, path in enumerate(files.values())])
        assert weights_checksum(fast.pipeline) == before
    assert np.array_equal(render(fast), base)


def test_weights_are_restored_when_the_generation_raises(
    tiny_pipeline: Any, files: dict[str, Path]
) -> None:
    fast = manager(tiny_pipeline)
    before = weights_checksum(fast.pipeline)
    inside: list[str] = []

    def fail_while_fused() -> None:
        with fast.apply_loras([request(files["peft_full"]), request(files["locon"], index=2)]):
            inside.append(weights_checksum(fast.pipeline))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_while_fused()
    assert inside[0] != before  # really fused while inside
    assert weights_checksum(fast.pipeline) == before


def test_weight_zero_everywhere_gives_the_base_image(
    tiny_pipeline: Any, files: dict[str, Path]
) -> None:
    fast = manager(tiny_pipeline)
    base = render(fast)
    assert np.array_equal(render(fast, [request(files["peft_full"], 0.0)]), base)


def test_no_cross_talk_between_requests(
    tiny_pipeline: Any,
    embedded_model_dir: Path,
    files: dict[str, Path],
) -> None:
    fast = manager(tiny_pipeline)
    render(fast, [request(files["kohya_half_alpha"], 2.0), request(files["locon"], 1.0, 2)])
    after_other = render(fast, [request(files["peft_unet"], 0.9, 3)])
    fresh = manager(
        StableDiffusionPipeline.from_pretrained(str(embedded_model_dir), local_files_only=True)
    )
    assert np.array_equal(after_other, render(fresh, [request(files["peft_unet"], 0.9, 3)]))


def test_cache_keeps_the_most_recently_used_within_its_count(
    tiny_pipeline: Any, files: dict[str, Path]
) -> None:
    fast = manager(tiny_pipeline, max_count=2)
    a, b, c = files["peft_unet"], files["kohya_unet"], files["locon"]
    for path in (a, b, a, c):
        render(fast, [request(path)])
    assert fast.loras.cache.keys() == ["peft_unet", "locon"]
    assert fast.loras.is_prepared("locon")
    assert not fast.loras.is_prepared("kohya_unet")


def test_cache_never_evicts_what_the_request_uses(
    tiny_pipeline: Any, files: dict[str, Path]
) -> None:
    fast = manager(tiny_pipeline, max_bytes=1)  # everything is over budget
    requests = [request(files["peft_unet"]), request(files["kohya_unet"], index=2)]
    fused_image = render(fast, requests)
    assert set(fast.loras.cache.keys()) == {"peft_unet", "kohya_unet"}
    render(fast, [request(files["locon"], index=3)])
    assert fast.loras.cache.keys() == ["locon"]
    assert np.array_equal(render(fast, requests), fused_image)


def test_a_prepared_lora_is_not_read_again(tiny_pipeline: Any, files: dict[str, Path]) -> None:
    fast = manager(tiny_pipeline)
    path = files["peft_full"]
    first = render(fast, [request(path)])
    assert fast.loras.is_prepared("peft_full")
    path.unlink()  # only the cached, prepared layers are left
    loads = LoadCounter(tiny_pipeline)
    assert np.array_equal(render(fast, [request(path)]), first)
    assert loads.calls == 0
    fast.loras.discard("peft_full")  # as when the LoRA is deleted
    assert not fast.loras.is_prepared("peft_full")
    with pytest.raises(LoRAIncompatibleError, match="'peft_full' cannot be used: its file is"):
        render(fast, [request(path)])  # read again: the file is gone


def test_cache_disabled_is_plan_006_load_and_unload(
    tiny_pipeline: Any,
    files: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    plan = manager(tiny_pipeline, max_count=0)
    before = weights_checksum(plan.pipeline)
    loads = LoadCounter(tiny_pipeline)
    with caplog.at_level(logging.INFO, logger=ENGINE_LOGGER):
        image = render(plan, [request(files["kohya_unet"], 0.5)])
    assert loads.calls == 1
    applying = [r.getMessage() for r in caplog.records if "Applying LoRA" in r.getMessage()]
    assert len(applying) == 1
    assert "'kohya_unet'" in applying[0]
    assert "weight 0.5" in applying[0]
    assert "Loaded 1 LoRA(s) as adapters" in caplog.text
    assert "Unloaded all LoRAs" in caplog.text
    assert "Fused" not in caplog.text
    assert plan.loras.cache.keys() == []
    assert not hasattr(tiny_pipeline.unet, "peft_config")
    assert weights_checksum(plan.pipeline) == before
    assert np.abs(image - render(plan)).max() > 0.01


def test_cache_disabled_fuses_what_diffusers_would_load_differently(
    tiny_pipeline: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kohya DoRA (``dora_scale``), which diffusers drops, is fused by the engine even with
    the cache disabled; nothing is kept afterwards."""
    dora = write_lora(tmp_path / "kdora.safetensors", tiny_pipeline, dora=True, seed=6)
    plain = write_lora(tmp_path / "kplain.safetensors", tiny_pipeline, seed=6)
    plan = manager(tiny_pipeline, max_count=0)
    before, base = weights_checksum(plan.pipeline), render(plan)
    loads = LoadCounter(tiny_pipeline)
    with caplog.at_level(logging.INFO, logger=ENGINE_LOGGER):
        image = render(plan, [request(dora)])
    assert loads.calls == 0
    assert "Fused 1 LoRA(s)" in caplog.text
    assert plan.loras.cache.keys() == []
    assert weights_checksum(plan.pipeline) == before
    assert np.abs(image - base).max() > 0.01
    assert np.abs(image - render(plan, [request(plain)])).max() > 0.01  # the magnitudes count


@pytest.mark.parametrize("weight", [1.0, 0.5])
@pytest.mark.parametrize("include_conv", [False, True], ids=["attention", "with-conv"])
def test_fused_dora_matches_diffusers_dora_adapter(
    tiny_pipeline: Any, tmp_path: Path, weight: float, include_conv: bool
) -> None:
    """PEFT DoRA (``lora_magnitude_vector``): the engine's fusion gives diffusers' image, the
    user's weight entering inside the norm as in PEFT (``DoRAStrength.INSIDE``)."""
    path = write_lora(
        tmp_path / "dora.safetensors",
        tiny_pipeline,
        fmt="peft",
        dora=True,
        include_conv=include_conv,
        seed=9,
    )
    fast = manager(tiny_pipeline)
    before, base = weights_checksum(fast.pipeline), render(fast)
    fused_image = render(fast, [request(path, weight)])
    assert fast.loras.cache.keys() == ["dora"]
    assert weights_checksum(fast.pipeline) == before
    tiny_pipeline.load_lora_weights(str(path), adapter_name="dora")
    try:
        tiny_pipeline.set_adapters(["dora"], [weight])
        reference = draw(tiny_pipeline)
    finally:
        tiny_pipeline.unload_lora_weights()
    assert np.abs(fused_image - reference).max() < FUSED_TOLERANCE
    assert np.abs(fused_image - base).max() > 0.01


# ---------------------------------------------------------------------------------------------
# Per-layer alphas: A1111's alpha/rank per layer, not one value for the file


def _two_layer_lora(path: Path, pipeline: Any, alphas: tuple[float, float]) -> list[Any]:
    """A Kohya file with one rank-4 layer on each of the first two ``to_q``, at ``alphas``;
    returns (module, alpha / rank * up @ down) per layer."""
    targets = lora_targets(pipeline, ("unet",), targets=("to_q",))[:2]
    generator = torch.Generator().manual_seed(3)
    tensors: dict[str, torch.Tensor] = {}
    expected: list[Any] = []
    for target, alpha in zip(targets, alphas, strict=True):
        down = torch.randn(4, target.in_features, generator=generator) * 0.2
        up = torch.randn(target.out_features, 4, generator=generator) * 0.2
        stem = "lora_unet_" + target.name.replace(".", "_")
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        expected.append((target.module, alpha / 4 * (up @ down)))
    save_file(tensors, str(path))
    return expected


def test_each_layer_gets_its_own_alpha(tiny_pipeline: Any, tmp_path: Path) -> None:
    path = tmp_path / "alphas.safetensors"
    layers = _two_layer_lora(path, tiny_pipeline, alphas=(1.0, 8.0))  # scales 0.25 and 2
    bases = [module.weight.detach().clone() for module, _ in layers]
    with manager(tiny_pipeline).apply_loras([request(path, 0.8)]):
        deltas = [m.weight.detach() - b for (m, _), b in zip(layers, bases, strict=True)]
    for delta, (_, scaled) in zip(deltas, layers, strict=True):
        torch.testing.assert_close(delta, 0.8 * scaled, rtol=1e-5, atol=1e-6)
    for (module, _), base in zip(layers, bases, strict=True):
        assert torch.equal(module.weight, base)


def test_per_layer_alphas_with_the_cache_off_as_with_it_on(
    tiny_pipeline: Any, tmp_path: Path
) -> None:
    """Plan 006's path gives the same image (diffusers 0.42.1 itself applies the most common
    alpha of a Kohya file to every layer)."""
    path = write_lora(tmp_path / "a.safetensors", tiny_pipeline)
    tensors = load_file(str(path))
    alpha_keys = sorted(key for key in tensors if key.endswith(".alpha"))
    tensors[alpha_keys[0]] = torch.tensor(1.0)  # one layer at a quarter strength
    mixed = tmp_path / "mixed.safetensors"
    save_file(tensors, str(mixed))
    fast, plan = manager(tiny_pipeline), manager(tiny_pipeline, max_count=0)
    fused = render(fast, [request(mixed)])
    assert np.abs(fused - render(fast, [request(path)])).max() > 0.01  # that alpha counts
    assert np.abs(render(plan, [request(mixed)]) - fused).max() < FUSED_TOLERANCE
