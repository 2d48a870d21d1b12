"""The generation-time fit check (``check_lora_fits_pipeline``) on real files, no mocks.

Besides checking the inspector, several tests pin down what diffusers 0.42.1 itself does with a
file (loads it, loads it partially, ignores part of it, fails): those facts are why the checks
exist, and the tests fail loudly if a diffusers upgrade changes them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from app.features.loras.lora_inspector import (
    IncompatibleLoRAError,
    LoRAFormat,
    LoRAInspection,
    check_lora_fits_pipeline,
)
from app.features.loras.safetensors_file import SafetensorsError, read_header
from tests.app.features.loras.pipeline_checks import (
    assert_refused_untouched,
    checksum,
    generate,
    has_adapters,
    inspect_file,
    load_and_generate,
)
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


# ---------------------------------------------------------------------------------------------
# Real LoRAs: inspected, accepted, and they really load and change the image


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers_legacy"])
@pytest.mark.parametrize(
    "components", [("unet",), ("unet", "text_encoder")], ids=["unet", "unet+te"]
)
def test_real_lora_is_accepted_and_changes_the_image(
    tmp_path: Path, pipeline: Any, fmt: Any, components: tuple[str, ...]
) -> None:
    path = write_lora(tmp_path / "style.safetensors", pipeline, fmt=fmt, components=components)
    expected_layers = len(lora_targets(pipeline, components))

    inspection = inspect_file(path)
    assert inspection == LoRAInspection(
        format=LoRAFormat(fmt),
        components=components,
        network_type="lora",
        layer_count=expected_layers,
        ranks=(4,),
    )

    base_image = generate(pipeline)
    base_state = checksum(pipeline)
    check_lora_fits_pipeline(path, pipeline, "style")
    assert checksum(pipeline) == base_state
    assert not has_adapters(pipeline)

    lora_image = load_and_generate(pipeline, path)
    assert np.isfinite(lora_image).all()
    assert np.abs(lora_image - base_image).mean() > 0.02
    assert checksum(pipeline) == base_state
    assert np.array_equal(generate(pipeline), base_image)


def test_full_trainer_layout(tmp_path: Path, pipeline: Any) -> None:
    both = ("unet", "text_encoder")
    path = write_lora(
        tmp_path / "full.safetensors", pipeline, components=both, targets=TRAINER_LAYOUT
    )
    inspection = inspect_file(path)
    assert inspection.layer_count == 60  # 4 x 12 in the UNet, 2 x 6 in the text encoder
    assert inspection.network_type == "lora"  # 1x1 proj_in/proj_out are part of plain LoRA
    check_lora_fits_pipeline(path, pipeline, "full")
    image = load_and_generate(pipeline, path)
    assert np.isfinite(image).all()
    assert np.abs(image - generate(pipeline)).mean() > 0.02


def test_a_pipeline_without_lora_support(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(tmp_path / "l.safetensors", pipeline)
    with pytest.raises(IncompatibleLoRAError, match="the loaded model does not support LoRAs"):
        check_lora_fits_pipeline(path, pipeline.vae, "l")


def test_text_encoder_only_lora(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(tmp_path / "te.safetensors", pipeline, components=("text_encoder",))
    inspection = inspect_file(path)
    assert inspection.components == ("text_encoder",)
    assert inspection.layer_count == 8
    check_lora_fits_pipeline(path, pipeline, "te")
    assert not np.array_equal(load_and_generate(pipeline, path), generate(pipeline))


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
    tmp_path: Path, pipeline: Any, options: dict[str, Any]
) -> None:
    kohya = write_lora(tmp_path / "k.safetensors", pipeline, fmt="kohya", **options)
    peft = write_lora(tmp_path / "p.safetensors", pipeline, fmt="peft", **options)
    for path in (kohya, peft):
        check_lora_fits_pipeline(path, pipeline, path.stem)
    kohya_image = load_and_generate(pipeline, kohya)
    peft_image = load_and_generate(pipeline, peft)
    assert np.array_equal(kohya_image, peft_image)
    assert not np.array_equal(kohya_image, generate(pipeline))


def test_legacy_format_matches_peft(tmp_path: Path, pipeline: Any) -> None:
    both = ("unet", "text_encoder")
    legacy = write_lora(
        tmp_path / "l.safetensors", pipeline, fmt="diffusers_legacy", components=both
    )
    peft = write_lora(tmp_path / "p.safetensors", pipeline, fmt="peft", components=both)
    assert np.array_equal(load_and_generate(pipeline, legacy), load_and_generate(pipeline, peft))


def test_kohya_alpha_scales_like_a_weight(tmp_path: Path, pipeline: Any) -> None:
    """alpha = rank/2 halves the LoRA: same as the full LoRA at adapter weight 0.5."""
    half = write_lora(tmp_path / "half.safetensors", pipeline, alpha=2.0)
    full = write_lora(tmp_path / "full.safetensors", pipeline)
    pipeline.load_lora_weights(str(full), adapter_name="full")
    pipeline.set_adapters(["full"], adapter_weights=[0.5])
    weighted = generate(pipeline)
    pipeline.unload_lora_weights()
    assert np.allclose(load_and_generate(pipeline, half), weighted, atol=1e-6)


def test_locon_with_3x3_convolutions(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(tmp_path / "locon.safetensors", pipeline, include_conv=True)
    inspection = inspect_file(path)
    assert inspection.network_type == "locon"
    assert inspection.layer_count == len(lora_targets(pipeline, ("unet",), include_conv=True))
    conv_keys = [
        key
        for key, info in read_header(path).tensors.items()
        if key.endswith("resnets_0_conv1.lora_down.weight")
    ]
    assert conv_keys
    assert read_header(path).tensors[conv_keys[0]].shape[2:] == (3, 3)
    check_lora_fits_pipeline(path, pipeline, "locon")
    conv_only = write_lora(tmp_path / "conv.safetensors", pipeline, targets=("conv1", "conv2"))
    assert inspect_file(conv_only).network_type == "locon"
    check_lora_fits_pipeline(conv_only, pipeline, "conv")
    assert not np.array_equal(load_and_generate(pipeline, conv_only), generate(pipeline))


def test_attention_only_1x1_projections_are_plain_lora(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "proj.safetensors", pipeline, targets=("to_q", "proj_in", "proj_out")
    )
    inspection = inspect_file(path)
    assert inspection.network_type == "lora"
    check_lora_fits_pipeline(path, pipeline, "proj")


def test_peft_dora_is_accepted_and_applied(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "dora.safetensors", pipeline, fmt="peft", dora=True, include_conv=True
    )
    assert inspect_file(path).network_type == "dora"
    check_lora_fits_pipeline(path, pipeline, "dora")
    plain = write_lora(tmp_path / "plain.safetensors", pipeline, fmt="peft", include_conv=True)
    dora_image = load_and_generate(pipeline, path)
    assert np.isfinite(dora_image).all()
    assert not np.array_equal(dora_image, load_and_generate(pipeline, plain))


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys:RuntimeWarning")
def test_mixed_ranks(tmp_path: Path, pipeline: Any, caplog: pytest.LogCaptureFixture) -> None:
    low = load_file(
        str(write_lora(tmp_path / "a.safetensors", pipeline, rank=2, targets=("to_q",)))
    )
    high = load_file(
        str(write_lora(tmp_path / "b.safetensors", pipeline, rank=8, targets=("to_v",)))
    )
    path = tmp_path / "mixed.safetensors"
    save_file({**low, **high}, str(path))
    inspection = inspect_file(path)
    assert inspection.ranks == (2, 8)
    with caplog.at_level(logging.WARNING, logger="app.features.loras.lora_inspector"):
        check_lora_fits_pipeline(path, pipeline, "mixed")
    # alpha = rank per layer: 2 and 8, which diffusers flattens to one value (see below).
    assert "sets different alpha values per layer (2, 8)" in caplog.text
    assert not np.array_equal(load_and_generate(pipeline, path), generate(pipeline))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_fits_while_other_adapters_are_loaded(tmp_path: Path, pipeline: Any) -> None:
    first = write_lora(tmp_path / "a.safetensors", pipeline, components=("unet", "text_encoder"))
    second = write_lora(tmp_path / "b.safetensors", pipeline, fmt="peft", seed=1, include_conv=True)
    pipeline.load_lora_weights(str(first), adapter_name="first")
    check_lora_fits_pipeline(second, pipeline, "second")
    assert list(pipeline.unet.peft_config) == ["first"]
    pipeline.load_lora_weights(str(second), adapter_name="second")
    bad = write_wrong_shapes(tmp_path / "bad.safetensors", pipeline)
    with pytest.raises(IncompatibleLoRAError):
        check_lora_fits_pipeline(bad, pipeline, "bad")
    assert sorted(pipeline.unet.peft_config) == ["first", "second"]


# ---------------------------------------------------------------------------------------------
# Does not fit the loaded model: refused before touching the pipeline


def test_lora_for_a_768_wide_cross_attention_model(tmp_path: Path, pipeline: Any) -> None:
    path = write_wrong_shapes(tmp_path / "sd15.safetensors", pipeline)
    assert inspect_file(path).format == LoRAFormat.KOHYA  # a valid LoRA, for another model
    error = assert_refused_untouched(path, pipeline, IncompatibleLoRAError)
    message = str(error)
    assert message.startswith(
        "LoRA 'my-lora' was made for a model with 768-wide cross-attention "
        "(Stable Diffusion 1.x); the loaded model has 32."
    )
    assert "8 of 32 layers do not fit" in message
    assert isinstance(error, IncompatibleLoRAError)
    assert error.total_layers == 32
    assert len(error.mismatched_layers) == 8
    assert error.missing_layers == ()
    # diffusers itself fails half way with a size mismatch.
    with pytest.raises(RuntimeError, match="size mismatch"):
        pipeline.load_lora_weights(str(path), adapter_name="x")


def test_lora_with_other_layer_widths(tmp_path: Path, pipeline: Any) -> None:
    path = write_wrong_shapes(tmp_path / "wide.safetensors", pipeline, kind="width", fmt="peft")
    error = assert_refused_untouched(path, pipeline, IncompatibleLoRAError)
    assert str(error) == (
        "LoRA 'my-lora' does not fit the loaded model: 4 of 32 layers have other sizes (e.g. "
        "layer unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q expects input "
        "width 320 / output width 320; the loaded model has 32/32)."
    )


def test_linear_lora_for_a_convolution(tmp_path: Path, pipeline: Any) -> None:
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "linear-proj.safetensors"
    save_file(
        {
            f"{stem}.lora_down.weight": torch.zeros(4, 32),
            f"{stem}.lora_up.weight": torch.zeros(32, 4),
        },
        str(path),
    )
    error = assert_refused_untouched(path, pipeline, IncompatibleLoRAError)
    assert "is a 1x1 convolution in the loaded model" in str(error)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_with_modules_the_model_does_not_have(tmp_path: Path, pipeline: Any, fmt: Any) -> None:
    path = write_unknown_modules(tmp_path / "bigger.safetensors", pipeline, fmt=fmt)
    assert inspect_file(path).layer_count == 34
    error = assert_refused_untouched(path, pipeline, IncompatibleLoRAError)
    assert str(error).startswith(
        "LoRA 'my-lora' does not fit the loaded model: 2 of 34 layers target modules the "
        "loaded model does not have (e.g. 'unet.down_blocks.3."
    )
    assert isinstance(error, IncompatibleLoRAError)
    assert sorted(error.missing_layers) == sorted(f"unet.{name}" for name in UNKNOWN_MODULES)
    # Why this matters: diffusers applies such a file partially, without an error.
    pipeline.load_lora_weights(str(path), adapter_name="x")
    assert "x" in pipeline.unet.peft_config


def test_text_encoder_layers_the_model_does_not_have(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "te.safetensors", pipeline, fmt="peft", components=("text_encoder",)
    )
    tensors = load_file(str(path))
    extra = "text_encoder.text_model.encoder.layers.11.self_attn.q_proj"
    tensors[f"{extra}.lora_A.weight"] = torch.zeros(4, 32)
    tensors[f"{extra}.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, str(path))
    error = assert_refused_untouched(path, pipeline, IncompatibleLoRAError)
    assert "1 of 9 layers target modules the loaded model does not have" in str(error)
    assert "text_encoder.encoder.layers.11.self_attn.q_proj" in str(error)


def test_sdxl_second_text_encoder_is_refused_on_sd(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(tmp_path / "xl.safetensors", pipeline, components=("unet", "text_encoder"))
    tensors = load_file(str(path))
    renamed = {key.replace("lora_te_", "lora_te2_"): value for key, value in tensors.items()}
    save_file(renamed, str(path))
    assert inspect_file(path).components == ("unet", "text_encoder_2")
    error = assert_refused_untouched(path, pipeline, IncompatibleLoRAError)
    assert "8 of 40 layers target modules the loaded model does not have" in str(error)
    assert "text_encoder_2." in str(error)


def test_wrong_shapes_and_missing_modules_together(tmp_path: Path, pipeline: Any) -> None:
    tensors = load_file(str(write_wrong_shapes(tmp_path / "a.safetensors", pipeline)))
    tensors.update(
        load_file(
            str(
                write_unknown_modules(tmp_path / "b.safetensors", pipeline, with_valid_layers=False)
            )
        )
    )
    path = tmp_path / "both.safetensors"
    save_file(tensors, str(path))
    message = str(assert_refused_untouched(path, pipeline, IncompatibleLoRAError))
    assert "768-wide cross-attention" in message
    assert "8 of 34 layers do not fit." in message
    assert "2 of 34 layers target modules the loaded model does not have" in message


# ---------------------------------------------------------------------------------------------
# Broken files through the generation-time check


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d, s: write_empty(d / "e.safetensors"), "is empty"),
        (lambda d, s: write_header_bomb(d / "b.safetensors"), "the header it declares is larger"),
        (lambda d, s: write_pickle_renamed(d / "p.safetensors"), "Pickle files can run code"),
        (lambda d, s: write_truncated(d / "t.safetensors", s), "is truncated"),
    ],
    ids=["empty", "header-bomb", "pickle", "truncated"],
)
def test_broken_files_are_refused_with_the_lora_name(
    tmp_path: Path, pipeline: Any, make: Any, expected: str
) -> None:
    source = write_lora(tmp_path / "source.safetensors", pipeline)
    path = make(tmp_path, source)
    with pytest.raises(SafetensorsError, match=expected):
        read_header(path)
    error = assert_refused_untouched(path, pipeline)
    assert str(error).startswith("LoRA 'my-lora' cannot be used: ")
    assert expected in str(error)


# ---------------------------------------------------------------------------------------------
# A diffusers quirk the fit check reports


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys:RuntimeWarning")
def test_per_layer_alphas_are_flattened_by_diffusers(
    tmp_path: Path, pipeline: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """diffusers applies the most common Kohya alpha to every layer (measured in 0.42.1)."""
    path = write_lora(tmp_path / "a.safetensors", pipeline)
    tensors = load_file(str(path))
    alpha_keys = sorted(key for key in tensors if key.endswith(".alpha"))
    tensors[alpha_keys[0]] = torch.tensor(1.0)  # one layer at a quarter strength
    mixed = tmp_path / "mixed.safetensors"
    save_file(tensors, str(mixed))
    with caplog.at_level(logging.WARNING, logger="app.features.loras.lora_inspector"):
        check_lora_fits_pipeline(mixed, pipeline, "mixed")
    assert "sets different alpha values per layer (1, 4)" in caplog.text
    assert np.array_equal(load_and_generate(pipeline, mixed), load_and_generate(pipeline, path))
