"""LoRA inspection and fit checks on real files and the real tiny pipeline (no mocks).

Besides checking the inspector, several tests pin down what diffusers 0.42.1 itself does with a
file (loads it, loads it partially, ignores part of it, fails): those facts are why the checks
exist, and the tests fail loudly if a diffusers upgrade changes them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from app.features.loras.lora_inspector import (
    IncompatibleLoRAError,
    InvalidLoRAError,
    LoRAFormat,
    LoRAInspection,
    check_lora_fits_pipeline,
    inspect_lora_header,
)
from app.features.loras.safetensors_file import SafetensorsError, read_header
from tests.factories.lora_files import (
    UNKNOWN_MODULES,
    lora_targets,
    write_down_without_up,
    write_empty,
    write_full_checkpoint_like,
    write_header_bomb,
    write_loha,
    write_lokr,
    write_lora,
    write_pickle_renamed,
    write_truncated,
    write_unknown_modules,
    write_unrelated_tensors,
    write_wrong_shapes,
)

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_Q = "lora_unet_" + Q.replace(".", "_")
# The layers kohya's sd-scripts trains for SD 1.x (UNet transformer blocks, text-encoder
# attention and MLP).
TRAINER_LAYOUT = (
    *("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
    *("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
)


@pytest.fixture
def pipeline(tiny_pipeline: StableDiffusionPipeline) -> Iterator[StableDiffusionPipeline]:
    yield tiny_pipeline
    tiny_pipeline.unload_lora_weights()


def generate(pipeline: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    result = pipeline(
        "a red cube",
        num_inference_steps=4,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    )
    image: np.ndarray = result.images[0]
    return image


def checksum(pipeline: Any) -> str:
    digest = hashlib.sha256()
    for component in (pipeline.unet, pipeline.text_encoder):
        for name, tensor in sorted(component.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def has_adapters(pipeline: Any) -> bool:
    return any(
        hasattr(component, "peft_config") or getattr(component, "_hf_peft_config_loaded", False)
        for component in (pipeline.unet, pipeline.text_encoder)
    )


def inspect_file(path: Path) -> LoRAInspection:
    return inspect_lora_header(read_header(path))


def assert_refused_untouched(
    path: Path, pipeline: Any, error: type[InvalidLoRAError] = InvalidLoRAError
) -> InvalidLoRAError:
    before = checksum(pipeline)
    with pytest.raises(error) as caught:
        check_lora_fits_pipeline(path, pipeline, "my-lora")
    assert checksum(pipeline) == before
    assert not has_adapters(pipeline)
    return caught.value


def load_and_generate(pipeline: Any, path: Path) -> np.ndarray:
    pipeline.load_lora_weights(str(path), adapter_name="x")
    try:
        return generate(pipeline)
    finally:
        pipeline.unload_lora_weights()


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


def test_kohya_dora_is_refused_because_diffusers_drops_dora_scale(
    tmp_path: Path, pipeline: Any
) -> None:
    dora = write_lora(tmp_path / "dora.safetensors", pipeline, dora=True)
    with pytest.raises(InvalidLoRAError, match=r"DoRA .*dora_scale"):
        inspect_file(dora)
    assert_refused_untouched(dora, pipeline)
    # The reason: diffusers loads the file but silently applies it as a plain LoRA.
    plain = write_lora(tmp_path / "plain.safetensors", pipeline)
    assert np.array_equal(load_and_generate(pipeline, dora), load_and_generate(pipeline, plain))


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


def test_metadata_is_ignored_for_classification(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "meta.safetensors",
        pipeline,
        metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": "4"},
    )
    header = read_header(path)
    assert header.metadata["ss_base_model_version"] == "sd_v1"
    assert inspect_lora_header(header).format == LoRAFormat.KOHYA


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
# Not LoRAs diffusers can apply


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_loha_and_lokr_are_refused_by_name(tmp_path: Path, pipeline: Any, fmt: Any) -> None:
    loha = write_loha(tmp_path / "loha.safetensors")
    lokr = write_lokr(tmp_path / "lokr.safetensors", fmt=fmt)
    with pytest.raises(InvalidLoRAError, match=r"^LoHa \(hada_\*\) LoRAs are not supported"):
        inspect_file(loha)
    with pytest.raises(InvalidLoRAError, match=r"^LoKr \(lokr_\*\) LoRAs are not supported"):
        inspect_file(lokr)
    message = str(assert_refused_untouched(lokr, pipeline))
    assert message.startswith("LoRA 'my-lora' cannot be used: LoKr")
    # diffusers refuses them too, only less clearly.
    for path in (loha, lokr):
        with pytest.raises(ValueError, match=r"not been correctly renamed|Invalid LoRA checkpoint"):
            pipeline.load_lora_weights(str(path), adapter_name="x")


@pytest.mark.parametrize(
    ("suffixes", "variant"),
    [
        ((".weight", ".on_input"), r"\(IA\)³"),
        ((".oft_blocks", ".alpha"), "OFT/BOFT"),
        ((".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"), "GLoRA"),
        ((".diff", ".diff_b"), r"full weight differences \(\.diff/\.diff_b\)"),
        ((".lora_down.weight", ".lora_mid.weight", ".lora_up.weight"), r"Tucker.*lora_mid"),
        ((".w_norm", ".b_norm"), "norm-layer"),
    ],
)
def test_other_lycoris_variants_are_refused_by_name(
    tmp_path: Path, suffixes: tuple[str, ...], variant: str
) -> None:
    path = tmp_path / "variant.safetensors"
    save_file({f"{KOHYA_Q}{suffix}": torch.zeros(4, 4) for suffix in suffixes}, str(path))
    with pytest.raises(InvalidLoRAError, match=variant):
        inspect_file(path)


def test_bundled_embeddings_are_refused(tmp_path: Path, pipeline: Any) -> None:
    tensors = load_file(str(write_lora(tmp_path / "l.safetensors", pipeline)))
    tensors["bundle_emb.mytoken.string_to_param.*"] = torch.zeros(2, 32)
    path = tmp_path / "bundle.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InvalidLoRAError, match="bundled textual-inversion"):
        inspect_file(path)


def test_full_checkpoint_is_not_a_lora(tmp_path: Path, pipeline: Any) -> None:
    path = write_full_checkpoint_like(tmp_path / "model.safetensors")
    with pytest.raises(InvalidLoRAError, match="looks like a full model checkpoint, not a LoRA"):
        inspect_file(path)
    assert_refused_untouched(path, pipeline)


def test_diffusers_model_weights_are_not_a_lora(tmp_path: Path, pipeline: Any) -> None:
    path = tmp_path / "unet.safetensors"
    state = {
        key: value for key, value in pipeline.unet.state_dict().items() if "down_blocks.0" in key
    }
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    with pytest.raises(InvalidLoRAError, match="full model checkpoint"):
        inspect_file(path)


def test_textual_inversion_is_not_a_lora(tmp_path: Path) -> None:
    path = tmp_path / "embedding.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(path))
    with pytest.raises(InvalidLoRAError, match="textual-inversion embedding"):
        inspect_file(path)


def test_unrelated_tensors(tmp_path: Path, pipeline: Any) -> None:
    path = write_unrelated_tensors(tmp_path / "stuff.safetensors")
    with pytest.raises(InvalidLoRAError, match="No LoRA weights found in this file"):
        inspect_file(path)
    assert_refused_untouched(path, pipeline)


def test_one_stray_key_in_a_lora(tmp_path: Path, pipeline: Any) -> None:
    tensors = load_file(str(write_lora(tmp_path / "l.safetensors", pipeline)))
    tensors["optimizer_step"] = torch.tensor(100)
    path = tmp_path / "stray.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(
        InvalidLoRAError,
        match=r"1 of the file's 97 tensors are not LoRA weights \('optimizer_step'\)",
    ):
        inspect_file(path)


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers_legacy"])
def test_down_without_up(tmp_path: Path, pipeline: Any, fmt: Any) -> None:
    path = write_down_without_up(tmp_path / "half.safetensors", pipeline, fmt=fmt)
    with pytest.raises(InvalidLoRAError, match="has a down/A weight but no up/B weight"):
        inspect_file(path)
    assert_refused_untouched(path, pipeline)


def test_up_without_down(tmp_path: Path) -> None:
    path = tmp_path / "up.safetensors"
    save_file({f"unet.{Q}.lora_B.weight": torch.zeros(32, 4)}, str(path))
    with pytest.raises(InvalidLoRAError, match="has an up/B weight but no down/A weight"):
        inspect_file(path)


def test_alpha_without_weights(tmp_path: Path) -> None:
    path = tmp_path / "alpha.safetensors"
    save_file(
        {
            f"{KOHYA_Q}.lora_down.weight": torch.zeros(4, 32),
            f"{KOHYA_Q}.lora_up.weight": torch.zeros(32, 4),
            "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    with pytest.raises(InvalidLoRAError, match="has only alpha and no LoRA weights"):
        inspect_file(path)


def test_rank_mismatch_between_down_and_up(tmp_path: Path) -> None:
    path = tmp_path / "ranks.safetensors"
    save_file(
        {
            f"{KOHYA_Q}.lora_down.weight": torch.zeros(4, 32),
            f"{KOHYA_Q}.lora_up.weight": torch.zeros(32, 8),
        },
        str(path),
    )
    with pytest.raises(
        InvalidLoRAError, match="down/A weight has rank 4 but its up/B weight has rank 8"
    ):
        inspect_file(path)


def test_mixed_formats(tmp_path: Path, pipeline: Any) -> None:
    kohya = load_file(str(write_lora(tmp_path / "k.safetensors", pipeline, targets=("to_q",))))
    peft = load_file(
        str(write_lora(tmp_path / "p.safetensors", pipeline, fmt="peft", targets=("to_v",)))
    )
    path = tmp_path / "mixed.safetensors"
    save_file({**kohya, **peft}, str(path))
    with pytest.raises(InvalidLoRAError, match=r"mixes LoRA key formats \(kohya and peft\)"):
        inspect_file(path)


def test_peft_keys_without_component_prefix(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(tmp_path / "p.safetensors", pipeline, fmt="peft")
    tensors = {key.removeprefix("unet."): value for key, value in load_file(str(path)).items()}
    save_file(tensors, str(path))
    with pytest.raises(InvalidLoRAError, match="do not say which part of the model"):
        inspect_file(path)
    # diffusers would load nothing, silently.
    pipeline.load_lora_weights(str(path), adapter_name="x")
    assert not has_adapters(pipeline)


def test_kohya_text_encoder_with_only_qkv_is_refused(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "qkv.safetensors",
        pipeline,
        components=("text_encoder",),
        targets=("q_proj", "k_proj", "v_proj"),
    )
    with pytest.raises(InvalidLoRAError, match="out_proj or MLP layers"):
        inspect_file(path)
    assert_refused_untouched(path, pipeline)
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        pipeline.load_lora_weights(str(path), adapter_name="x")


def test_integer_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ints.safetensors"
    save_file(
        {
            f"{KOHYA_Q}.lora_down.weight": torch.zeros(4, 32, dtype=torch.int32),
            f"{KOHYA_Q}.lora_up.weight": torch.zeros(32, 4),
        },
        str(path),
    )
    with pytest.raises(InvalidLoRAError, match="holds I32 values, not floating point"):
        inspect_file(path)


def test_non_text_metadata_is_refused(tmp_path: Path, pipeline: Any) -> None:
    from tests.factories.lora_files import write_raw_header

    source = read_header(write_lora(tmp_path / "l.safetensors", pipeline, targets=("to_q",)))
    raw = (tmp_path / "l.safetensors").read_bytes()
    data = raw[source.data_start :]
    header: dict[str, Any] = {
        name: {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": list(i.data_offsets)}
        for name, i in source.tensors.items()
    }
    header["__metadata__"] = {"ss_network_dim": 4}
    path = write_raw_header(tmp_path / "meta.safetensors", header, data)
    with pytest.raises(InvalidLoRAError, match="metadata has entries that are not text"):
        inspect_file(path)


def test_broken_adapter_metadata_is_refused(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "m.safetensors",
        pipeline,
        fmt="peft",
        metadata={"lora_adapter_metadata": "{oops"},
    )
    with pytest.raises(
        InvalidLoRAError, match="'lora_adapter_metadata' metadata is not valid JSON"
    ):
        inspect_file(path)


def test_peft_alpha_metadata_is_validated_at_generation(tmp_path: Path, pipeline: Any) -> None:
    good = write_lora(tmp_path / "good.safetensors", pipeline, fmt="peft", alpha=8.0)
    check_lora_fits_pipeline(good, pipeline, "good")
    bad = write_lora(
        tmp_path / "bad.safetensors",
        pipeline,
        fmt="peft",
        metadata={"lora_adapter_metadata": '{"unet.r": 4, "unet.no_such_option": 1}'},
    )
    message = str(assert_refused_untouched(bad, pipeline))
    assert "adapter metadata for unet is not a valid LoRA configuration" in message


# ---------------------------------------------------------------------------------------------
# Broken files through the generation-time check


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d, s: write_empty(d / "e.safetensors"), "is empty"),
        (lambda d, s: write_header_bomb(d / "b.safetensors"), "declares a header of"),
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
