"""Base-model detection from LoRA keys and shapes, and metadata claims.

Real files throughout: family-shaped LoRAs from ``tests.factories.family_loras`` (realistic
names at the real models' and the tiny test models' widths, rank 1, in each trainer's format),
LoRAs for the tiny embedded model from ``lora_files``, and a few hand-made key sets for the
edge cases (headers alone where a real-size tensor would be megabytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from app.cores.lora_files.base_model import Detection, _lycoris_widths, detect_base_model
from app.cores.lora_files.base_model_verdict import (
    MetadataClaim,
    base_model_of,
    conflict_note,
    metadata_claim,
    resolve_base_model,
)
from app.cores.lora_files.safetensors_file import SafetensorsHeader, TensorInfo, read_header
from app.cores.model_manager.embedded_model import _CROSS_ATTENTION_DIM
from app.cores.model_manager.model_family import (
    TINY_CROSS_ATTENTION_DIM,
    ModelFamily,
    family_of_pipeline,
    is_compatible,
)
from tests.factories.family_loras import FORMATS, Family, FamilyFormat, Size, write_family_lora
from tests.factories.family_models import FamilyModelDir
from tests.factories.lora_files import write_lora, write_unknown_modules, write_wrong_shapes

F = ModelFamily


def header_of(path: Path) -> SafetensorsHeader:
    return read_header(path)


def write_shapes(
    path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None
) -> SafetensorsHeader:
    """A file with zero tensors of these shapes: only names and shapes matter here."""
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path), metadata)
    return read_header(path)


def kohya(name: str, width_in: int, width_out: int, rank: int = 1) -> dict[str, tuple[int, ...]]:
    return {
        f"{name}.lora_down.weight": (rank, width_in),
        f"{name}.lora_up.weight": (width_out, rank),
        f"{name}.alpha": (),
    }


def peft(name: str, width_in: int, width_out: int, rank: int = 1) -> dict[str, tuple[int, ...]]:
    return {f"{name}.lora_A.weight": (rank, width_in), f"{name}.lora_B.weight": (width_out, rank)}


def in_memory(shapes: dict[str, tuple[int, ...]], **metadata: str) -> SafetensorsHeader:
    """A header without a file: detection reads names and shapes only."""
    tensors = {key: TensorInfo("F16", shape, (0, 0)) for key, shape in shapes.items()}
    return SafetensorsHeader(tensors=tensors, metadata=metadata, header_length=0, file_size=0)


TINY_VARIANTS: dict[Family, ModelFamily] = {
    "sd1": F.TINY,
    "sd2": F.TINY_SD2,
    "sdxl": F.TINY_SDXL,
    "sd3": F.TINY_SD3,
    "flux": F.TINY_FLUX,
}


# ---------------------------------------------------------------------------------------------
# Real families


@pytest.mark.parametrize(
    ("family", "fmt"), [(family, fmt) for family, formats in FORMATS.items() for fmt in formats]
)
@pytest.mark.parametrize("size", ["real", "tiny"])
@pytest.mark.parametrize("text_encoders", [True, False], ids=["with-te", "no-te"])
def test_family_shaped_loras_are_detected(
    tmp_path: Path, family: Family, fmt: FamilyFormat, size: Size, text_encoders: bool
) -> None:
    path = write_family_lora(
        tmp_path / "x.safetensors", family, fmt=fmt, size=size, text_encoders=text_encoders
    )
    assert path.stat().st_size < 300_000  # tiny ranks, few layers
    detection = detect_base_model(header_of(path))
    expected = ModelFamily(family) if size == "real" else TINY_VARIANTS[family]
    assert detection.family is expected, detection
    if fmt == "kohya_t5" and text_encoders:
        width = 4096 if size == "real" else 64
        assert detection.evidence.endswith(f"; T5 text-encoder layers {width} wide")


@pytest.mark.parametrize("family", TINY_VARIANTS)
def test_tiny_loras_fit_the_tiny_model_and_real_ones_the_real_model(
    tmp_path: Path, family: Family, family_model_dir: FamilyModelDir
) -> None:
    folder = family_model_dir("flux-dev" if family == "flux" else family)
    tiny_model = family_of_pipeline(DiffusionPipeline.from_pretrained(str(folder)))
    real_model = ModelFamily(family)
    fmt = FORMATS[family][-1]  # a LoKr SDXL file, an XLabs FLUX.1 one
    tiny = detect_base_model(
        header_of(write_family_lora(tmp_path / "t", family, fmt=fmt, size="tiny"))
    )
    real = detect_base_model(header_of(write_family_lora(tmp_path / "r", family, fmt=fmt)))
    assert (tiny.family, real.family) == (tiny_model, real_model)
    assert is_compatible(tiny.family, tiny_model) is True
    assert is_compatible(real.family, tiny_model) is False
    assert is_compatible(tiny.family, real_model) is False
    assert tiny_model.architecture is real_model


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers_legacy"])
@pytest.mark.parametrize(
    "components", [("unet",), ("unet", "text_encoder"), ("text_encoder",)], ids=["u", "u+te", "te"]
)
def test_loras_for_the_embedded_model_are_tiny(
    tmp_path: Path, tiny_pipeline: Any, fmt: Any, components: tuple[str, ...]
) -> None:
    path = write_lora(tmp_path / "t.safetensors", tiny_pipeline, fmt=fmt, components=components)
    assert detect_base_model(header_of(path)).family is F.TINY


def test_tiny_width_is_the_embedded_models(tiny_pipeline: Any) -> None:
    assert TINY_CROSS_ATTENTION_DIM == _CROSS_ATTENTION_DIM
    assert tiny_pipeline.unet.config.cross_attention_dim == TINY_CROSS_ATTENTION_DIM
    assert family_of_pipeline(tiny_pipeline) is F.TINY


def test_locon_and_dora_for_the_embedded_model(tmp_path: Path, tiny_pipeline: Any) -> None:
    locon = write_lora(tmp_path / "c.safetensors", tiny_pipeline, include_conv=True)
    dora = write_lora(tmp_path / "d.safetensors", tiny_pipeline, fmt="peft", dora=True)
    assert detect_base_model(header_of(locon)).family is F.TINY
    assert detect_base_model(header_of(dora)).family is F.TINY


@pytest.mark.parametrize("kind", ["cross_attention", "width"])
def test_contradictory_shapes_are_unknown(tmp_path: Path, tiny_pipeline: Any, kind: Any) -> None:
    # 768-wide cross-attention beside 32-wide attention: no real model is shaped like that.
    path = write_wrong_shapes(tmp_path / "w.safetensors", tiny_pipeline, kind=kind)
    detection = detect_base_model(header_of(path))
    assert detection.family is F.UNKNOWN
    assert "contradictory" in detection.evidence


def test_modules_the_model_lacks_do_not_change_the_family(
    tmp_path: Path, tiny_pipeline: Any
) -> None:
    # The family fits; the size check at generation catches the missing modules.
    path = write_unknown_modules(tmp_path / "u.safetensors", tiny_pipeline)
    assert detect_base_model(header_of(path)).family is F.TINY


def test_sdxl_kohya_with_diffusers_block_names(tmp_path: Path) -> None:
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1"
    header = write_shapes(
        tmp_path / "x.safetensors",
        kohya(f"{stem}_attn2_to_k", 2048, 640) | kohya(f"{stem}_attn1_to_q", 640, 640),
    )
    assert detect_base_model(header).family is F.SDXL


def test_legacy_processor_names_are_read(tmp_path: Path) -> None:
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    header = write_shapes(
        tmp_path / "x.safetensors",
        {
            f"{block}.to_k_lora.down.weight": (1, 1024),
            f"{block}.to_k_lora.up.weight": (320, 1),
        },
    )
    assert detect_base_model(header).family is F.SD2


def test_a_second_text_encoder_alone_means_sdxl(tmp_path: Path) -> None:
    layer = "text_model_encoder_layers_0_self_attn_q_proj"
    header = write_shapes(
        tmp_path / "x.safetensors",
        kohya(f"lora_te1_{layer}", 768, 768) | kohya(f"lora_te2_{layer}", 1280, 1280),
    )
    detection = detect_base_model(header)
    assert detection.family is F.SDXL
    assert "second text encoder" in detection.evidence


def test_sd2_text_encoder_alone(tmp_path: Path) -> None:
    layer = "lora_te_text_model_encoder_layers_3_mlp_fc1"
    header = write_shapes(tmp_path / "x.safetensors", kohya(layer, 1024, 4096))
    assert detect_base_model(header).family is F.SD2


@pytest.mark.parametrize(
    ("shapes", "evidence"),
    [
        pytest.param(
            peft("transformer.single_transformer_blocks.0.attn.to_q", 2048, 2048),
            "2048 wide",
            id="flux-style-other-width",
        ),
        pytest.param(
            kohya("lora_unet_double_blocks_19_img_attn_qkv", 3072, 9216),
            "beyond FLUX.1",
            id="hunyuan-video-block-count",
        ),
        pytest.param(
            peft("transformer.joint_transformer_blocks.0.attn.add_q_proj", 3072, 3072)
            | peft("transformer.single_transformer_blocks.0.attn.to_q", 3072, 3072),
            "unrecognised",
            id="auraflow",
        ),
        pytest.param(
            peft("transformer.transformer_blocks.0.attn.add_q_proj", 3072, 3072),
            "no Stable Diffusion 3 size",
            id="qwen-image-like",
        ),
        pytest.param(
            peft("transformer.blocks.0.attn1.to_q", 1536, 1536),
            "unrecognised",
            id="wan-like",
        ),
        pytest.param(
            kohya(
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 4096, 320
            ),
            "no known model",
            id="odd-cross-attention",
        ),
        pytest.param(
            kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320)
            | kohya(
                "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 1024, 1280
            ),
            "different widths",
            id="two-cross-attention-widths",
        ),
        pytest.param(
            kohya("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320),
            "block widths [320]",  # SD 1.x, 2.x and SDXL alike
            id="only-resnets",
        ),
        pytest.param(
            kohya("lora_unet_time_embedding_linear_1", 320, 1280),
            "tells the models apart",
            id="only-time-embedding",
        ),
    ],
)
def test_unrecognised_shapes_are_unknown(
    tmp_path: Path, shapes: dict[str, tuple[int, ...]], evidence: str
) -> None:
    detection = detect_base_model(write_shapes(tmp_path / "x.safetensors", shapes))
    assert detection.family is F.UNKNOWN
    assert evidence in detection.evidence


def test_sd3_large_width(tmp_path: Path) -> None:
    shapes = peft("transformer.transformer_blocks.37.attn.add_k_proj", 2432, 2432)
    assert detect_base_model(write_shapes(tmp_path / "x.safetensors", shapes)).family is F.SD3


_SDXL_K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
_SD_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def roles(stem: str, **shapes: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {f"{stem}.{role}": shape for role, shape in shapes.items()}


@pytest.mark.parametrize(
    ("shapes", "family"),
    [
        (roles(_SDXL_K, diff=(640, 2048)), F.SDXL),
        (roles(_SDXL_K, lokr_w1=(8, 32), lokr_w2=(80, 64)), F.SDXL),  # (8*80) x (32*64)
        (roles(_SDXL_K, lokr_w1_a=(8, 2), lokr_w1_b=(2, 8), lokr_w2=(8, 8)), F.TINY_SDXL),
        (roles(_SD_K, hada_w1_a=(32, 2), hada_w1_b=(2, 48)), F.TINY_SD2),
    ],
    ids=["diff", "lokr", "lokr-low-rank-w1", "loha"],
)
def test_lycoris_layers_are_read_for_their_widths(
    shapes: dict[str, tuple[int, ...]], family: ModelFamily
) -> None:
    assert detect_base_model(in_memory(shapes)).family is family


def test_tucker_lycoris_factors_are_read_transposed() -> None:
    # Conv layers with a Tucker core store the a-factors as (rank, out): 3x3, 64 -> 32 wide.
    loha = {"hada_t1": (4, 4, 3, 3), "hada_w1_a": (4, 32), "hada_w1_b": (4, 64)}
    lokr = {"lokr_w1": (2, 4), "lokr_t2": (4, 4, 3, 3), "lokr_w2_a": (4, 16), "lokr_w2_b": (4, 16)}
    assert _lycoris_widths(loha) == (64, 32)
    assert _lycoris_widths(lokr) == (64, 32)


_BLOCK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


@pytest.mark.parametrize(
    ("shapes", "candidates", "evidence"),
    [
        (kohya(f"{_BLOCK}_attn1_to_q", 32, 32), {F.TINY, F.TINY_SD2}, "attention widths [32]"),
        (
            {f"{_CONV}.lora_down.weight": (1, 32, 3, 3), f"{_CONV}.lora_up.weight": (32, 1, 1, 1)},
            None,
            "block widths [32]",
        ),
    ],
    ids=["self-attention", "locon-conv"],
)
def test_where_only_tiny_models_remain_the_embedded_one_is_chosen(
    shapes: dict[str, tuple[int, ...]], candidates: set[ModelFamily] | None, evidence: str
) -> None:
    # The tiny UNets share their block widths; the embedded model is the one the server ships.
    detection = detect_base_model(in_memory(shapes))
    assert detection.family is F.TINY
    assert detection.candidates == (candidates or {F.TINY, F.TINY_SD2, F.TINY_SDXL})
    assert detection.evidence == f"{evidence}; the embedded model's widths"


_T5_Q = "encoder_block_0_layer_0_SelfAttention_q"
_FLUX_QKV = kohya("lora_unet_double_blocks_0_img_attn_qkv", 3072, 9216)


def test_t5_layers_alone_leave_sd3_and_flux_open() -> None:
    shapes = kohya(f"lora_te3_{_T5_Q}", 4096, 4096)
    detection = detect_base_model(in_memory(shapes))
    assert detection.family is F.UNKNOWN
    assert detection.candidates == {F.SD3, F.FLUX}
    assert detection.evidence == "T5 text-encoder layers 4096 wide and no transformer layers"
    chosen = base_model_of(in_memory(shapes, ss_base_model_version="flux1"))
    assert chosen.family is F.FLUX
    assert "chosen by its metadata" in chosen.evidence


def test_t5_layers_of_the_other_size_contradict_the_blocks() -> None:
    detection = detect_base_model(in_memory(_FLUX_QKV | kohya(f"lora_te3_{_T5_Q}", 64, 64)))
    assert detection.family is F.UNKNOWN
    assert detection.evidence == (
        "contradictory shapes (FLUX-style double/single-stream blocks 3072 wide; "
        "T5 text-encoder layers 64 wide)"
    )


def test_t5_as_a_second_text_encoder_is_not_sdxls() -> None:
    # OneTrainer names FLUX.1's T5 lora_te2_, as SDXL's second CLIP is named.
    t5 = kohya(f"lora_te2_{_T5_Q}", 4096, 4096)
    clip = kohya("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    assert detect_base_model(in_memory(_FLUX_QKV | t5)).family is F.FLUX
    assert detect_base_model(in_memory(clip | t5)).candidates == {F.SD3, F.FLUX}


def test_one_text_encoder_alone_is_not_sdxl() -> None:
    shapes = kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    detection = detect_base_model(in_memory(shapes))
    assert detection.family is F.SD1
    assert detection.evidence == "text-encoder width 768; layers for one text encoder only"


# ---------------------------------------------------------------------------------------------
# Metadata claims


@pytest.mark.parametrize(
    ("metadata", "family", "key"),
    [
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, F.SDXL, "modelspec"),
        ({"modelspec.architecture": "stable-diffusion-v1/lora"}, F.SD1, "modelspec"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, F.SD2, "modelspec"),
        ({"modelspec.architecture": "stable-diffusion-3-medium/lora"}, F.SD3, "modelspec"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, F.FLUX, "modelspec"),
        ({"modelspec.architecture": "lumina-2/lora"}, F.UNKNOWN, "modelspec"),
        ({"ss_base_model_version": "sdxl_base_v1-0"}, F.SDXL, "ss_base"),
        ({"ss_base_model_version": "sd_v1", "ss_v2": "False"}, F.SD1, "ss_base"),
        ({"ss_base_model_version": "flux1"}, F.FLUX, "ss_base"),
        ({"ss_v2": "True", "ss_sd_model_name": "v1-5-pruned.ckpt"}, F.SD2, "ss_v2"),
        ({"ss_sd_model_name": "ponyDiffusionV6XL.safetensors"}, F.SDXL, "ss_sd_model"),
        ({"ss_sd_model_name": "v1-5-pruned-emaonly.safetensors"}, F.SD1, "ss_sd_model"),
        ({"ss_sd_model_name": "v2-1_768-ema-pruned.safetensors"}, F.SD2, "ss_sd_model"),
    ],
)
def test_metadata_claims(metadata: dict[str, str], family: ModelFamily, key: str) -> None:
    claim = metadata_claim(metadata)
    assert claim is not None
    assert claim.family is family
    assert claim.key.startswith(key)


@pytest.mark.parametrize(
    "metadata", [{}, {"ss_sd_model_name": "a8f3e2.safetensors"}, {"ss_v2": "False"}]
)
def test_metadata_that_names_no_model(metadata: dict[str, str]) -> None:
    assert metadata_claim(metadata) is None


def test_shapes_win_over_the_metadata_and_the_conflict_is_reported(tmp_path: Path) -> None:
    path = write_family_lora(
        tmp_path / "x.safetensors", "sd1", metadata={"ss_base_model_version": "sdxl_base_v1-0"}
    )
    base = base_model_of(header_of(path))
    assert base.family is F.SD1
    assert base.conflict
    note = conflict_note(base)
    assert note is not None
    assert "SDXL" in note
    assert "Stable Diffusion 1.x" in note


def test_metadata_chooses_only_among_what_the_shapes_allow(tmp_path: Path) -> None:
    # Self-attention only, 320 wide: SD 1.x or 2.x, the shapes cannot tell which.
    shapes = kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320)
    open_header = write_shapes(tmp_path / "a.safetensors", shapes)
    detection = detect_base_model(open_header)
    assert detection.family is F.UNKNOWN
    assert detection.candidates == {F.SD1, F.SD2}

    chosen = resolve_base_model(detection, MetadataClaim(F.SD2, "ss_v2", "True"))
    assert chosen.family is F.SD2
    assert "chosen by its metadata" in chosen.evidence
    impossible = resolve_base_model(detection, MetadataClaim(F.SDXL, "ss_base_model_version", "x"))
    assert impossible.family is F.UNKNOWN
    assert not impossible.conflict


def test_resolution_keeps_a_known_family() -> None:
    detection = Detection(F.TINY, frozenset({F.TINY}), "cross-attention input width 32")
    base = resolve_base_model(detection, MetadataClaim(F.SD1, "ss_base_model_version", "sd_v1"))
    assert base.family is F.TINY
    assert base.conflict
