"""The generation-time fit check, which runs inside ``PipelineManager.apply_loras``, on real
files and the real tiny pipeline, no mocks: what fits is applied, what does not is refused
with ``LoRAIncompatibleError`` before any weight changes, with the cache on (the engine fuses)
and off (Plan 006: diffusers loads the plain files).

Several tests pin down what diffusers 0.42.1 itself does with a file (fails half way, applies
part of it): those facts are why the check exists, and the tests fail loudly if a diffusers
upgrade changes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from app.cores.lora_engine import LoRACache, LoRAIncompatibleError, LoRARequest
from app.cores.lora_files.inspection import inspect_lora_header
from app.cores.lora_files.inspection_types import LoRAFormat, LoRAInspection
from app.cores.lora_files.safetensors_file import SafetensorsError, read_header
from app.cores.model_manager.pipeline_manager import PipelineManager
from app.exceptions import BadRequestError
from tests.checksums import weights_checksum as checksum
from tests.factories.lora_files import (
    UNKNOWN_MODULES,
    lora_targets,
    write_empty,
    write_header_bomb,
    write_lora,
    write_pickle_renamed,
    write_truncated,
    write_unknown_modules,
    write_wrong_shapes,
)

# The layers kohya's sd-scripts trains for SD 1.x (UNet transformer blocks, text-encoder
# attention and MLP).
TRAINER_LAYOUT = (
    *("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
    *("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
)
# The engine's fusion against diffusers' unfused adapters: see test_engine.py.
FUSED_TOLERANCE = 1e-3
CACHE = pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])


def generate(pipeline: Any) -> np.ndarray:
    result = pipeline(
        "a red cube",
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    image: np.ndarray = result.images[0]
    return image


def manager(pipeline: Any, cache: bool = True) -> PipelineManager:
    lora_cache = LoRACache(16, 1 << 30) if cache else LoRACache(0, 0)
    return PipelineManager(pipeline, "tiny", torch.device("cpu"), lora_cache=lora_cache)


def request(
    path: Path, weight: float = 1.0, name: str | None = None, index: int = 1
) -> LoRARequest:
    return LoRARequest(
        id=index, name=name or path.stem, path=path, content_key=str(path), weight=weight
    )


def applied(pipeline: Any, *requests: LoRARequest, cache: bool = True) -> np.ndarray:
    """The image with ``requests`` applied; the weights are the base's again afterwards."""
    before = checksum(pipeline)
    with manager(pipeline, cache).apply_loras(list(requests)):
        image = generate(pipeline)
    assert checksum(pipeline) == before
    assert not has_adapters(pipeline)
    return image


def has_adapters(pipeline: Any) -> bool:
    return any(hasattr(c, "peft_config") for c in (pipeline.unet, pipeline.text_encoder))


def inspect_file(path: Path) -> LoRAInspection:
    return inspect_lora_header(read_header(path))


def load_and_generate(pipeline: Any, path: Path) -> np.ndarray:
    """diffusers' own loader, as Plan 006 used it."""
    pipeline.load_lora_weights(str(path), adapter_name="x")
    try:
        return generate(pipeline)
    finally:
        pipeline.unload_lora_weights()


def assert_refused_untouched(path: Path, pipeline: Any) -> LoRAIncompatibleError:
    """Refused as 'my-lora' with the cache on and off, the same way, the weights untouched."""
    errors = []
    for cache in (True, False):
        before = checksum(pipeline)
        applying = manager(pipeline, cache).apply_loras([request(path, name="my-lora")])
        with pytest.raises(LoRAIncompatibleError) as caught, applying:
            pytest.fail("the block ran")
        assert checksum(pipeline) == before
        assert not has_adapters(pipeline)
        errors.append(caught.value)
    assert str(errors[0]) == str(errors[1])
    assert isinstance(errors[0], BadRequestError)
    assert errors[0].status_code == 400
    return errors[0]


# ---------------------------------------------------------------------------------------------
# Real LoRAs: inspected, accepted, and they really change the image


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers_legacy"])
@pytest.mark.parametrize(
    "components",
    [("unet",), ("unet", "text_encoder"), ("text_encoder",)],
    ids=["unet", "unet+te", "te"],
)
def test_real_lora_is_accepted_and_changes_the_image(
    tmp_path: Path, tiny_pipeline: Any, fmt: Any, components: tuple[str, ...]
) -> None:
    path = write_lora(tmp_path / "style.safetensors", tiny_pipeline, fmt=fmt, components=components)
    assert inspect_file(path) == LoRAInspection(
        format=LoRAFormat(fmt),
        components=components,
        network_type="lora",
        layer_count=len(lora_targets(tiny_pipeline, components)),
        ranks=(4,),
    )
    base_image = generate(tiny_pipeline)
    lora_image = applied(tiny_pipeline, request(path))
    assert np.isfinite(lora_image).all()
    assert np.abs(lora_image - base_image).mean() > 0.02
    assert np.abs(lora_image - load_and_generate(tiny_pipeline, path)).max() < FUSED_TOLERANCE
    assert np.array_equal(generate(tiny_pipeline), base_image)


def test_full_trainer_layout(tmp_path: Path, tiny_pipeline: Any) -> None:
    both = ("unet", "text_encoder")
    path = write_lora(
        tmp_path / "full.safetensors", tiny_pipeline, components=both, targets=TRAINER_LAYOUT
    )
    inspection = inspect_file(path)
    assert inspection.layer_count == 60  # 4 x 12 in the UNet, 2 x 6 in the text encoder
    assert inspection.network_type == "lora"  # 1x1 proj_in/proj_out are part of plain LoRA
    image = applied(tiny_pipeline, request(path))
    assert np.isfinite(image).all()
    assert np.abs(image - generate(tiny_pipeline)).mean() > 0.02


@CACHE
def test_kohya_text_encoder_lora_with_only_q_k_v_is_applied(
    tmp_path: Path, tiny_pipeline: Any, cache: bool
) -> None:
    """diffusers cannot tell the format of such a file; the engine reads its names itself."""
    options: dict[str, Any] = {
        "components": ("text_encoder",),
        "targets": ("q_proj", "k_proj", "v_proj"),
    }
    kohya = write_lora(tmp_path / "k.safetensors", tiny_pipeline, fmt="kohya", **options)
    peft = write_lora(tmp_path / "p.safetensors", tiny_pipeline, fmt="peft", **options)
    expected = applied(tiny_pipeline, request(peft))
    assert not np.array_equal(expected, generate(tiny_pipeline))
    image = applied(tiny_pipeline, request(kohya), cache=cache)
    assert np.abs(image - expected).max() < FUSED_TOLERANCE


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"components": ("unet",)}, id="unet"),
        pytest.param({"components": ("unet", "text_encoder")}, id="unet+te"),
        pytest.param(
            {"components": ("unet", "text_encoder"), "text_model_prefix": False}, id="te-flat"
        ),
        pytest.param({"include_conv": True}, id="locon"),
        pytest.param(
            {"components": ("unet", "text_encoder"), "targets": TRAINER_LAYOUT}, id="trainer-layout"
        ),
        pytest.param({"alpha": 2.0}, id="alpha-half"),
        pytest.param(
            {"rank": 8, "alpha": 4.0, "components": ("unet", "text_encoder")}, id="rank8-alpha4"
        ),
    ],
)
def test_kohya_and_peft_files_of_the_same_weights_give_identical_images(
    tmp_path: Path, tiny_pipeline: Any, options: dict[str, Any]
) -> None:
    kohya = write_lora(tmp_path / "k.safetensors", tiny_pipeline, fmt="kohya", **options)
    peft = write_lora(tmp_path / "p.safetensors", tiny_pipeline, fmt="peft", **options)
    kohya_image = applied(tiny_pipeline, request(kohya))
    assert np.array_equal(kohya_image, applied(tiny_pipeline, request(peft)))
    assert not np.array_equal(kohya_image, generate(tiny_pipeline))


def test_legacy_format_matches_peft(tmp_path: Path, tiny_pipeline: Any) -> None:
    both = ("unet", "text_encoder")
    legacy = write_lora(
        tmp_path / "l.safetensors", tiny_pipeline, fmt="diffusers_legacy", components=both
    )
    peft = write_lora(tmp_path / "p.safetensors", tiny_pipeline, fmt="peft", components=both)
    legacy_image = applied(tiny_pipeline, request(legacy))
    assert np.array_equal(legacy_image, applied(tiny_pipeline, request(peft)))
    assert not np.array_equal(legacy_image, generate(tiny_pipeline))


def test_kohya_alpha_scales_like_a_weight(tmp_path: Path, tiny_pipeline: Any) -> None:
    """alpha = rank/2 halves the LoRA: same as the full LoRA at weight 0.5."""
    half = write_lora(tmp_path / "half.safetensors", tiny_pipeline, alpha=2.0)
    full = write_lora(tmp_path / "full.safetensors", tiny_pipeline)
    weighted = applied(tiny_pipeline, request(full, 0.5))
    assert np.allclose(applied(tiny_pipeline, request(half)), weighted, atol=1e-6)
    assert not np.allclose(applied(tiny_pipeline, request(full)), weighted, atol=1e-3)


def test_locon_with_3x3_convolutions(tmp_path: Path, tiny_pipeline: Any) -> None:
    path = write_lora(tmp_path / "locon.safetensors", tiny_pipeline, include_conv=True)
    inspection = inspect_file(path)
    assert inspection.network_type == "locon"
    assert inspection.layer_count == len(lora_targets(tiny_pipeline, ("unet",), include_conv=True))
    tensors = read_header(path).tensors
    conv_keys = [key for key in tensors if key.endswith("resnets_0_conv1.lora_down.weight")]
    assert conv_keys
    assert tensors[conv_keys[0]].shape[2:] == (3, 3)
    assert not np.array_equal(applied(tiny_pipeline, request(path)), generate(tiny_pipeline))
    conv_only = write_lora(tmp_path / "conv.safetensors", tiny_pipeline, targets=("conv1", "conv2"))
    assert inspect_file(conv_only).network_type == "locon"
    assert not np.array_equal(applied(tiny_pipeline, request(conv_only)), generate(tiny_pipeline))


def test_attention_only_1x1_projections_are_plain_lora(tmp_path: Path, tiny_pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "proj.safetensors", tiny_pipeline, targets=("to_q", "proj_in", "proj_out")
    )
    assert inspect_file(path).network_type == "lora"
    assert not np.array_equal(applied(tiny_pipeline, request(path)), generate(tiny_pipeline))


@CACHE
def test_a_linear_lora_for_a_1x1_convolution_is_applied_reshaped(
    tmp_path: Path, tiny_pipeline: Any, cache: bool
) -> None:
    """``proj_in`` is a 1x1 convolution in the tiny UNet: a LoRA written for a linear
    ``proj_in`` (2-D tensors) changes the same weights, as A1111 applies it."""
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    generator = torch.Generator().manual_seed(7)
    down = torch.randn(4, 32, generator=generator) * 0.3
    up = torch.randn(32, 4, generator=generator) * 0.3
    linear, conv = tmp_path / "linear.safetensors", tmp_path / "conv.safetensors"
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}, str(linear))
    save_file(
        {
            f"{stem}.lora_down.weight": down[:, :, None, None].contiguous(),
            f"{stem}.lora_up.weight": up[:, :, None, None].contiguous(),
        },
        str(conv),
    )
    expected = applied(tiny_pipeline, request(conv))
    assert not np.array_equal(expected, generate(tiny_pipeline))
    image = applied(tiny_pipeline, request(linear), cache=cache)
    assert np.abs(image - expected).max() < FUSED_TOLERANCE


def test_peft_dora_is_accepted_and_applied(tmp_path: Path, tiny_pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "dora.safetensors", tiny_pipeline, fmt="peft", dora=True, include_conv=True
    )
    assert inspect_file(path).network_type == "dora"
    plain = write_lora(tmp_path / "plain.safetensors", tiny_pipeline, fmt="peft", include_conv=True)
    dora_image = applied(tiny_pipeline, request(path))
    assert np.isfinite(dora_image).all()
    assert not np.array_equal(dora_image, applied(tiny_pipeline, request(plain)))


def test_mixed_ranks(tmp_path: Path, tiny_pipeline: Any) -> None:
    """alpha = rank per layer (2 and 8): each layer at scale 1, as the two files give."""
    low = write_lora(tmp_path / "a.safetensors", tiny_pipeline, rank=2, targets=("to_q",))
    high = write_lora(tmp_path / "b.safetensors", tiny_pipeline, rank=8, targets=("to_v",))
    path = tmp_path / "mixed.safetensors"
    save_file({**load_file(str(low)), **load_file(str(high))}, str(path))
    assert inspect_file(path).ranks == (2, 8)
    image = applied(tiny_pipeline, request(path))
    assert not np.array_equal(image, generate(tiny_pipeline))
    assert np.array_equal(image, applied(tiny_pipeline, request(low), request(high, index=2)))


@CACHE
def test_one_misfit_among_several_refuses_the_request_before_anything_is_loaded(
    tmp_path: Path, tiny_pipeline: Any, cache: bool
) -> None:
    both = ("unet", "text_encoder")
    first = write_lora(tmp_path / "a.safetensors", tiny_pipeline, components=both)
    second = write_lora(tmp_path / "b.safetensors", tiny_pipeline, fmt="peft", seed=1)
    bad = write_wrong_shapes(tmp_path / "bad.safetensors", tiny_pipeline)
    target = manager(tiny_pipeline, cache)
    before = checksum(tiny_pipeline)
    requests = [request(first), request(second, index=2), request(bad, index=3)]
    applying = target.apply_loras(requests)
    with pytest.raises(LoRAIncompatibleError, match="LoRA 'bad' was made for"), applying:
        pytest.fail("the block ran")
    assert checksum(tiny_pipeline) == before
    assert not has_adapters(tiny_pipeline)
    with target.apply_loras(requests[:2]):
        assert checksum(tiny_pipeline) != before or has_adapters(tiny_pipeline)


# ---------------------------------------------------------------------------------------------
# Does not fit the loaded model: refused before touching the pipeline


def test_lora_for_a_768_wide_cross_attention_model(tmp_path: Path, tiny_pipeline: Any) -> None:
    path = write_wrong_shapes(tmp_path / "sd15.safetensors", tiny_pipeline)
    assert inspect_file(path).format == LoRAFormat.KOHYA  # a valid LoRA, for another model
    message = str(assert_refused_untouched(path, tiny_pipeline))
    assert message.startswith(
        "LoRA 'my-lora' was made for a model with 768-wide cross-attention "
        "(Stable Diffusion 1.x); the loaded model has 32."
    )
    assert "8 of 32 layers do not fit." in message
    assert "target modules" not in message
    # diffusers itself fails half way with a size mismatch.
    with pytest.raises(RuntimeError, match="size mismatch"):
        tiny_pipeline.load_lora_weights(str(path), adapter_name="x")


def test_lora_with_other_layer_widths(tmp_path: Path, tiny_pipeline: Any) -> None:
    path = write_wrong_shapes(
        tmp_path / "wide.safetensors", tiny_pipeline, kind="width", fmt="peft"
    )
    assert str(assert_refused_untouched(path, tiny_pipeline)) == (
        "LoRA 'my-lora' does not fit the loaded model: 4 of 32 layers have other sizes (e.g. "
        "layer unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q changes a "
        "320x320 weight; the loaded model's is 32x32)."
    )


@pytest.mark.parametrize(("fmt", "prefix"), [("kohya", "lora_unet_"), ("peft", "unet.")])
def test_lora_with_modules_the_model_does_not_have(
    tmp_path: Path, tiny_pipeline: Any, fmt: Any, prefix: str
) -> None:
    path = write_unknown_modules(tmp_path / "bigger.safetensors", tiny_pipeline, fmt=fmt)
    assert inspect_file(path).layer_count == 34
    message = str(assert_refused_untouched(path, tiny_pipeline))
    assert message.startswith(
        "LoRA 'my-lora' does not fit the loaded model: 2 of 34 layers target modules the "
        "loaded model does not have (e.g. '"
    )
    for module in UNKNOWN_MODULES:  # as the file names them
        name = prefix + (module.replace(".", "_") if fmt == "kohya" else module)
        assert f"'{name}'" in message
    # Why this matters: diffusers applies such a file partially, without an error.
    tiny_pipeline.load_lora_weights(str(path), adapter_name="x")
    assert "x" in tiny_pipeline.unet.peft_config


def test_text_encoder_layers_the_model_does_not_have(tmp_path: Path, tiny_pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "te.safetensors", tiny_pipeline, fmt="peft", components=("text_encoder",)
    )
    tensors = load_file(str(path))
    extra = "text_encoder.text_model.encoder.layers.11.self_attn.q_proj"
    tensors[f"{extra}.lora_A.weight"] = torch.zeros(4, 32)
    tensors[f"{extra}.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, str(path))
    message = str(assert_refused_untouched(path, tiny_pipeline))
    assert "1 of 9 layers target modules the loaded model does not have" in message
    assert f"(e.g. '{extra}')" in message


def test_sdxl_second_text_encoder_is_refused_on_sd(tmp_path: Path, tiny_pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "xl.safetensors", tiny_pipeline, components=("unet", "text_encoder")
    )
    tensors = load_file(str(path))
    renamed = {key.replace("lora_te_", "lora_te2_"): value for key, value in tensors.items()}
    save_file(renamed, str(path))
    assert inspect_file(path).components == ("unet", "text_encoder_2")
    message = str(assert_refused_untouched(path, tiny_pipeline))
    assert "8 of 40 layers target modules the loaded model does not have" in message
    assert "(e.g. 'lora_te2_text_model_encoder_layers_" in message


def test_wrong_shapes_and_missing_modules_together(tmp_path: Path, tiny_pipeline: Any) -> None:
    tensors = load_file(str(write_wrong_shapes(tmp_path / "a.safetensors", tiny_pipeline)))
    unknown = write_unknown_modules(
        tmp_path / "b.safetensors", tiny_pipeline, with_valid_layers=False
    )
    tensors.update(load_file(str(unknown)))
    path = tmp_path / "both.safetensors"
    save_file(tensors, str(path))
    message = str(assert_refused_untouched(path, tiny_pipeline))
    assert "768-wide cross-attention" in message
    assert "8 of 34 layers do not fit." in message
    assert "2 of 34 layers target modules the loaded model does not have" in message


# ---------------------------------------------------------------------------------------------
# Broken files


@pytest.mark.parametrize(
    ("make", "upload_check"),
    [
        (lambda d, s: write_empty(d / "e.safetensors"), "is empty"),
        (lambda d, s: write_header_bomb(d / "b.safetensors"), "the header it declares is larger"),
        (lambda d, s: write_pickle_renamed(d / "p.safetensors"), "Pickle files can run code"),
        (lambda d, s: write_truncated(d / "t.safetensors", s), "is truncated"),
    ],
    ids=["empty", "header-bomb", "pickle", "truncated"],
)
def test_broken_files_are_refused_with_the_lora_name(
    tmp_path: Path, tiny_pipeline: Any, make: Any, upload_check: str
) -> None:
    """A file broken after its upload (which would have refused it) is a 400 naming it."""
    path = make(tmp_path, write_lora(tmp_path / "source.safetensors", tiny_pipeline))
    with pytest.raises(SafetensorsError, match=upload_check):
        read_header(path)
    message = str(assert_refused_untouched(path, tiny_pipeline))
    assert message.startswith("LoRA 'my-lora' cannot be used: ")
    assert message.removeprefix("LoRA 'my-lora' cannot be used: ").strip()
