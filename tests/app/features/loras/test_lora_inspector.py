"""LoRA header inspection on real files: formats, classification and refused variants.

The upload check reads layers with the engine's grammar, so what it accepts the engine
applies (``tests/app/cores/lora_engine`` shows each format applied); what it refuses, it
refuses with a sentence, and the engine refuses the same file at generation untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from app.cores.lora_files.inspection import inspect_lora_header
from app.cores.lora_files.inspection_types import InvalidLoRAError, LoRAFormat
from app.cores.lora_files.safetensors_file import read_header
from tests.app.features.loras.pipeline_checks import (
    assert_refused_untouched,
    has_adapters,
    inspect_file,
    load_and_generate,
)
from tests.factories.lora_files import (
    write_down_without_up,
    write_full_checkpoint_like,
    write_lora,
    write_unrelated_tensors,
)

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_Q = "lora_unet_" + Q.replace(".", "_")


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
# LyCORIS variants: classified; others refused by name


@pytest.mark.parametrize(
    ("tensors", "network_type"),
    [
        (
            {
                ".hada_w1_a": (32, 4),
                ".hada_w1_b": (4, 32),
                ".hada_w2_a": (32, 4),
                ".hada_w2_b": (4, 32),
            },
            "loha",
        ),
        ({".lokr_w1": (4, 4), ".lokr_w2": (8, 8)}, "lokr"),
        ({".diff": (32, 32), ".diff_b": (32,)}, "full"),
        (
            {".lora_down.weight": (4, 32), ".lora_up.weight": (32, 4), ".dora_scale": (1, 32)},
            "dora",
        ),
    ],
)
def test_lycoris_variants_are_classified(
    tmp_path: Path, tensors: dict[str, tuple[int, ...]], network_type: str
) -> None:
    path = tmp_path / "variant.safetensors"
    save_file(
        {f"{KOHYA_Q}{suffix}": torch.zeros(shape) for suffix, shape in tensors.items()}, str(path)
    )
    inspection = inspect_file(path)
    assert inspection.network_type == network_type
    assert inspection.format == LoRAFormat.KOHYA
    assert inspection.components == ("unet",)


def test_kohya_dora_is_applied_unlike_diffusers_which_drops_dora_scale(
    tmp_path: Path, pipeline: Any
) -> None:
    dora = write_lora(tmp_path / "dora.safetensors", pipeline, dora=True)
    assert inspect_file(dora).network_type == "dora"
    # diffusers loads the file but silently applies it as a plain LoRA; the engine does not
    # (tests/app/cores/lora_engine compares its DoRA result with the formula).
    plain = write_lora(tmp_path / "plain.safetensors", pipeline)
    assert np.array_equal(load_and_generate(pipeline, dora), load_and_generate(pipeline, plain))


@pytest.mark.parametrize(
    ("suffixes", "variant"),
    [
        ((".ia3_l",), r"PEFT \(IA\)³"),
        ((".boft_R",), "BOFT"),
        ((".vera_lambda_b",), "VeRA"),
    ],
)
def test_variants_no_supported_path_applies_are_refused_by_name(
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


def test_mixed_formats_are_read_layer_by_layer(tmp_path: Path, pipeline: Any) -> None:
    kohya = load_file(str(write_lora(tmp_path / "k.safetensors", pipeline, targets=("to_q",))))
    peft = load_file(
        str(write_lora(tmp_path / "p.safetensors", pipeline, fmt="peft", targets=("to_v",)))
    )
    path = tmp_path / "mixed.safetensors"
    save_file({**kohya, **peft}, str(path))
    inspection = inspect_file(path)
    assert inspection.layer_count == len(kohya) // 3 + len(peft) // 2


def test_peft_keys_without_component_prefix(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(tmp_path / "p.safetensors", pipeline, fmt="peft")
    tensors = {key.removeprefix("unet."): value for key, value in load_file(str(path)).items()}
    save_file(tensors, str(path))
    with pytest.raises(InvalidLoRAError, match="do not say which part of the model"):
        inspect_file(path)
    # diffusers would load nothing, silently.
    pipeline.load_lora_weights(str(path), adapter_name="x")
    assert not has_adapters(pipeline)


def test_kohya_text_encoder_with_only_qkv_is_accepted(tmp_path: Path, pipeline: Any) -> None:
    path = write_lora(
        tmp_path / "qkv.safetensors",
        pipeline,
        components=("text_encoder",),
        targets=("q_proj", "k_proj", "v_proj"),
    )
    assert inspect_file(path).components == ("text_encoder",)
    # diffusers cannot tell the format of such a file; the engine maps each layer by name.
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


@pytest.mark.parametrize(
    "broken", ["{oops", "[" * 100_000 + "]" * 100_000], ids=["not-json", "nested-too-deep"]
)
def test_broken_adapter_metadata_is_refused(tmp_path: Path, pipeline: Any, broken: str) -> None:
    path = write_lora(
        tmp_path / "m.safetensors",
        pipeline,
        fmt="peft",
        metadata={"lora_adapter_metadata": broken},
    )
    with pytest.raises(
        InvalidLoRAError, match="'lora_adapter_metadata' metadata is not valid JSON"
    ):
        inspect_file(path)


def test_adapter_metadata_that_is_no_lora_configuration_is_refused(
    tmp_path: Path, pipeline: Any
) -> None:
    bad = write_lora(
        tmp_path / "bad.safetensors",
        pipeline,
        fmt="peft",
        metadata={"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": "lots"}'},
    )
    with pytest.raises(
        InvalidLoRAError, match="metadata for unet is not a valid LoRA configuration"
    ):
        inspect_file(bad)
    message = str(assert_refused_untouched(bad, pipeline))
    assert message.startswith("LoRA 'my-lora' cannot be used:")
