"""Single-file checkpoints: which family a file is, from its header, and what is refused.

Three sources of files: the tiny family models written in the original layout by
``tests.factories.checkpoints`` (real tensors), the real published architectures built on the
``meta`` device (``test_model_family.real_pipeline`` plus the real VAEs) and named by the same
map (headers only: real key names and shapes, no weights), and what users offer by mistake
(LoRAs, a VAE or a text encoder alone, a UNet without the rest)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    convert_sd3_transformer_checkpoint_to_diffusers,
)

from app.cores.lora_files.safetensors_file import SafetensorsError, TensorInfo, read_header
from app.cores.model_manager.checkpoint_files import (
    CheckpointInfo,
    CheckpointRefused,
    RefusalKind,
    detect_checkpoint,
    inspect_checkpoint,
)
from app.cores.model_manager.model_family import ModelFamily
from tests.app.cores.model_manager.test_model_family import real_pipeline
from tests.factories.checkpoints import (
    Layout,
    Tensors,
    all_but_the_denoiser,
    clip_to_openclip,
    header_of,
    original_state_dict,
    save_checkpoint,
    write_checkpoint,
    write_header_only,
    write_lora_checkpoint,
    write_text_encoder_only,
    write_vae_only,
)
from tests.factories.family_models import FAMILIES, Family, FamilyModelDir, build_family_pipeline

F = ModelFamily

# ---------------------------------------------------------------------------------------------
# The tiny family models, written whole in the original layout

_FLUX_TINY = "FLUX.1 transformer 32 wide (double-stream blocks: 1, single-stream: 1) "
_FLUX_TEXT = "; text encoders CLIP-L 32 + T5 64 wide; VAE"
TINY: dict[Family, tuple[F, str | None, str]] = {
    "sd1": (F.TINY, None, "UNet with 32-wide cross-attention; text encoder CLIP 32 wide; VAE"),
    "sd2": (F.TINY_SD2, None,
            "UNet with 48-wide cross-attention; text encoder OpenCLIP 48 wide; VAE. Whether it "
            "predicts v (SD 2.x 768-v) or noise (512-base) is not in the weights: it comes from "
            "the config or from you"),
    "sdxl": (F.TINY_SDXL, None,
             "UNet with 64-wide cross-attention and size conditioning (label_emb); text "
             "encoders CLIP 32 + OpenCLIP 32 wide; VAE"),
    "sd3": (F.TINY_SD3, None,
            "MMDiT 32 wide (2 joint blocks); text encoders CLIP-L 32 + CLIP-G 32 + T5 64 wide; "
            "VAE"),
    "flux-dev": (F.TINY_FLUX, "dev",
                 f"{_FLUX_TINY}with guidance embedding (as FLUX.1 dev){_FLUX_TEXT}"),
    "flux-schnell": (F.TINY_FLUX, "schnell",
                     f"{_FLUX_TINY}without guidance embedding (as FLUX.1 schnell){_FLUX_TEXT}"),
}  # fmt: skip


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_tiny_family_written_whole_is_detected(family: Family, scratch: Path) -> None:
    path = write_checkpoint(family, scratch / f"{family}.safetensors", dtype=torch.float16)
    info = inspect_checkpoint(path)
    expected, variant, evidence = TINY[family]
    assert (info.family, info.variant, info.evidence) == (expected, variant, evidence)
    assert (info.has_vae, info.has_text_encoders, info.missing) == (True, True, ())
    assert info.dtype == "F16"
    pipeline = build_family_pipeline(family)
    components = [getattr(pipeline, name, None) for name in pipeline.components]
    weights = sum(
        tensor.numel()
        for component in components
        if isinstance(component, torch.nn.Module)
        for tensor in component.state_dict().values()
    )
    assert info.parameter_count == weights  # every weight of the pipeline, once (T5: twice)


def test_flux_without_the_prefix_and_sd3_without_t5(scratch: Path) -> None:
    flux = write_checkpoint("flux-dev", scratch / "flux-bare.safetensors", denoiser_prefix="")
    info = inspect_checkpoint(flux)
    assert (info.family, info.variant, info.denoiser_prefix, info.dtype) == (
        F.TINY_FLUX,
        "dev",
        "",
        "F32",
    )
    sd3 = write_checkpoint("sd3", scratch / "sd3-no-t5.safetensors", without={"text_encoder_3"})
    info = inspect_checkpoint(sd3)
    assert info.family is F.TINY_SD3
    assert [e.label for e in info.text_encoders] == ["CLIP-L", "CLIP-G"]
    assert info.evidence == (
        "MMDiT 32 wide (2 joint blocks); text encoders CLIP-L 32 + CLIP-G 32 wide "
        "(no T5: SD3 runs without it); VAE"
    )
    assert (info.has_text_encoders, info.missing) == (True, ())


# ---------------------------------------------------------------------------------------------
# The real architectures: header-only files named by the same map


def _real_vae(latent_channels: int) -> AutoencoderKL:
    """The SD/SDXL VAE (4 latent channels) or SD3's and FLUX.1's (16, no quant convs)."""
    flow = latent_channels == 16
    with torch.device("meta"):
        return AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=latent_channels,
            use_quant_conv=not flow,
            use_post_quant_conv=not flow,
        )


_FLUX_REAL = "FLUX.1 transformer 3072 wide (double-stream blocks: 19, single-stream: 38) "
_SD3_TEXT = "; text encoders CLIP-L 768 + CLIP-G 1280 + T5 4096"
REAL: dict[str, tuple[Layout, F, str | None, str]] = {
    "sd1.5": ("sd1", F.SD1, None, "UNet with 768-wide cross-attention; text encoder CLIP 768"),
    "sd2.1": ("sd2", F.SD2, None,
              "UNet with 1024-wide cross-attention; text encoder OpenCLIP 1024"),
    "sdxl-base": ("sdxl", F.SDXL, None,
                  "UNet with 2048-wide cross-attention and size conditioning (label_emb); text "
                  "encoders CLIP 768 + OpenCLIP 1280"),
    "sd3-medium": ("sd3", F.SD3, "3-medium", f"MMDiT 1536 wide (24 joint blocks){_SD3_TEXT}"),
    "sd3.5-large": ("sd3", F.SD3, "3.5-large", f"MMDiT 2432 wide (38 joint blocks){_SD3_TEXT}"),
    "flux-dev": ("flux", F.FLUX, "dev",
                 f"{_FLUX_REAL}with guidance embedding (as FLUX.1 dev); text encoders CLIP-L "
                 "768 + T5 4096"),
    "flux-schnell": ("flux", F.FLUX, "schnell",
                     f"{_FLUX_REAL}without guidance embedding (as FLUX.1 schnell); text "
                     "encoders CLIP-L 768 + T5 4096"),
}  # fmt: skip
"""Layout, family, variant and the evidence up to the last width (" wide; VAE" follows)."""


@cache
def real_state(name: str) -> dict[str, torch.Tensor]:
    """The real architecture ``name`` in its single-file layout, on the meta device."""
    layout = REAL[name][0]
    source = real_pipeline(name)
    names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    parts = {part: getattr(source, part, None) for part in names}
    vae = _real_vae(16 if layout in ("sd3", "flux") else 4)
    return original_state_dict(SimpleNamespace(vae=vae, **parts), layout)


@pytest.mark.parametrize("name", REAL)
def test_each_real_architecture_is_detected_from_its_header(name: str) -> None:
    _, family, variant, evidence = REAL[name]
    header = header_of(real_state(name))
    info = detect_checkpoint(header.tensors, f"{name}.safetensors")
    assert (info.family, info.variant) == (family, variant)
    assert info.evidence.startswith(evidence + " wide; VAE"), info.evidence
    assert info.missing == ()
    assert info.dtype == "F16"


def test_a_real_size_file_is_read_without_its_weights(tmp_path: Path) -> None:
    # 2 GB of SD 1.5 in float16, sparse: only the header is ever read.
    path = write_header_only(tmp_path / "v1-5-pruned-emaonly.safetensors", real_state("sd1.5"))
    assert path.stat().st_size > 2_000_000_000
    info = inspect_checkpoint(path)
    assert (info.family, info.dtype) == (F.SD1, "F16")
    assert 1_000_000_000 < info.parameter_count < 1_100_000_000  # UNet 860M + CLIP 123M + VAE 84M


def _without_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def test_the_real_layouts_are_what_diffusers_converts() -> None:
    """The factory's map, run backwards by diffusers' own converters, gives every parameter of
    the real models with its shape (meta tensors: names and shapes, no values)."""
    checks: list[tuple[Any, dict[str, torch.Tensor]]] = []
    for name in ("sd1.5", "sdxl-base"):
        unet, state = real_pipeline(name).unet, real_state(name)
        checks.append((unet, convert_ldm_unet_checkpoint(state, dict(unet.config))))
        # ``Any``: diffusers leaves a model's ``config`` unannotated.
        vae: Any = _real_vae(4)
        checks.append((vae, convert_ldm_vae_checkpoint(state, dict(vae.config))))
    encoder = real_pipeline("sdxl-base").text_encoder_2
    state = real_state("sdxl-base")
    converted = convert_open_clip_checkpoint(
        encoder, state, prefix="conditioner.embedders.1.model."
    )
    checks.append((encoder, converted))
    converters: tuple[tuple[str, Callable[[Tensors], Tensors]], ...] = (
        ("sd3.5-large", convert_sd3_transformer_checkpoint_to_diffusers),
        ("flux-dev", convert_flux_transformer_checkpoint_to_diffusers),
    )
    for name, convert in converters:
        transformer = real_pipeline(name).transformer
        checks.append(
            (transformer, convert(_without_prefix(real_state(name), "model.diffusion_model.")))
        )
    for module, converted in checks:
        expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
        assert {key: tuple(value.shape) for key, value in converted.items()} == expected
    assert clip_to_openclip(encoder)["text_projection"].shape == (1280, 1280)


# ---------------------------------------------------------------------------------------------
# Refusals: what users offer as a model that is not one


LORAS = [
    ("sd1", "kohya"),
    ("sdxl", "peft"),
    ("sdxl", "loha"),
    ("sdxl", "lokr"),
    ("sd3", "kohya"),
    ("flux", "bfl"),
    ("flux", "xlabs"),
]


@pytest.mark.parametrize(("family", "fmt"), LORAS)
def test_a_lora_is_sent_to_the_lora_upload(family: Any, fmt: str, tmp_path: Path) -> None:
    path = write_lora_checkpoint(tmp_path / "detail-tweaker.safetensors", family, fmt)
    with pytest.raises(CheckpointRefused) as refused:
        inspect_checkpoint(path)
    assert refused.value.kind is RefusalKind.LORA
    assert str(refused.value).startswith("'detail-tweaker.safetensors' is a LoRA (it holds")
    assert str(refused.value).endswith("not a model: add it with POST /loras/upload.")


VAE_DETAIL = (
    "'vae.safetensors' is a VAE alone (encoder and decoder weights, no UNet or text encoders), "
    "not a model. A VAE is not imported on its own (A1111 keeps them in models/VAE): import a "
    "checkpoint that includes its VAE, as most do."
)


@pytest.mark.parametrize(
    ("layout", "prefix"), [("ldm", ""), ("diffusers", ""), ("ldm", "first_stage_model.")]
)
def test_a_vae_alone_is_refused(layout: str, prefix: str, tmp_path: Path) -> None:
    path = write_vae_only(tmp_path / "vae.safetensors", layout=layout, prefix=prefix)
    with pytest.raises(CheckpointRefused) as refused:
        inspect_checkpoint(path)
    assert (refused.value.kind, refused.value.detail) == (RefusalKind.VAE, VAE_DETAIL)


@pytest.mark.parametrize(
    ("family", "component", "prefix", "what"),
    [
        ("sd1", "text_encoder", "", "a CLIP"),  # ComfyUI's clip_l.safetensors
        ("flux-dev", "text_encoder_2", "", "a T5"),  # t5xxl_fp16.safetensors
        ("sd1", "text_encoder", "cond_stage_model.transformer.", "a CLIP"),
    ],
)
def test_a_text_encoder_alone_is_refused(
    family: Family, component: str, prefix: str, what: str, tmp_path: Path
) -> None:
    path = write_text_encoder_only(tmp_path / "te.safetensors", family, component, prefix=prefix)
    with pytest.raises(CheckpointRefused) as refused:
        inspect_checkpoint(path)
    assert refused.value.kind is RefusalKind.TEXT_ENCODER
    assert refused.value.detail == (
        f"'te.safetensors' is {what} text encoder alone (no UNet or transformer), not a model. "
        "A text encoder is not imported on its own (ComfyUI keeps them in models/text_encoders): "
        "import a checkpoint that includes its text encoders."
    )


def test_a_unet_without_the_rest_says_what_is_missing(tmp_path: Path) -> None:
    path = write_checkpoint(
        "sd1", tmp_path / "unet.safetensors", without=all_but_the_denoiser("sd1")
    )
    info = detect_checkpoint(read_header(path).tensors, path.name)
    assert (info.family, info.has_vae, info.has_text_encoders) == (F.TINY, False, False)
    assert info.missing == ("the VAE", "the CLIP text encoder")
    with pytest.raises(CheckpointRefused) as refused:
        inspect_checkpoint(path)
    assert refused.value.kind is RefusalKind.INCOMPLETE
    assert refused.value.detail == (
        "'unet.safetensors' holds the UNet of the tiny embedded test model without the VAE and "
        "the CLIP text encoder. Single-file models load only with their VAE and text encoders "
        "in the same file (a 'full' or 'pruned' checkpoint, as CivitAI and A1111 use)."
    )


def test_an_sdxl_file_without_its_vae_is_refused(tmp_path: Path) -> None:
    path = write_checkpoint("sdxl", tmp_path / "sdxl.safetensors", without={"vae"})
    with pytest.raises(CheckpointRefused, match=r"SDXL test model without the VAE\. Single"):
        inspect_checkpoint(path)


def test_the_flux_transformer_alone_points_to_the_diffusers_folder(tmp_path: Path) -> None:
    without = all_but_the_denoiser("flux-dev")
    path = write_checkpoint(
        "flux-dev", tmp_path / "flux1-dev.safetensors", without=without, denoiser_prefix=""
    )
    with pytest.raises(CheckpointRefused) as refused:
        inspect_checkpoint(path)
    assert refused.value.kind is RefusalKind.INCOMPLETE
    detail = refused.value.detail
    assert "transformer of the tiny FLUX.1 test model without the VAE, the CLIP-L text " in detail
    assert "encoder and the T5 text encoder." in detail
    assert detail.endswith(
        "import the FLUX.1 diffusers folder, or an all-in-one file such as ComfyUI's flux1-dev-fp8."
    )


def test_a_diffusers_unet_file_is_sent_to_its_folder(family_model_dir: FamilyModelDir) -> None:
    path = family_model_dir("sdxl") / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointRefused) as refused:
        inspect_checkpoint(path)
    assert refused.value.kind is RefusalKind.INCOMPLETE
    assert "is a UNet alone in diffusers' layout" in refused.value.detail
    assert refused.value.detail.endswith("import the whole diffusers folder instead.")


def _header(state: dict[str, torch.Tensor], **changes: tuple[int, ...]) -> dict[str, TensorInfo]:
    tensors = dict(header_of(state).tensors)
    for key, shape in changes.items():
        tensors[key] = dataclasses.replace(tensors[key], shape=shape)
    return tensors


UNSUPPORTED: dict[str, tuple[str, dict[str, tuple[int, ...]], str]] = {
    "inpainting": (
        "sd1.5",
        {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)},
        "'x.safetensors' is an inpainting model reading 9 input channels; only text-to-image "
        "models (4 latent channels) can be imported.",
    ),
    "flux-fill": (
        "flux-dev",
        {"model.diffusion_model.img_in.weight": (3072, 384)},
        "'x.safetensors' is a FLUX.1 variant reading 384 input channels (Fill, Depth or Canny), "
        "not a text-to-image model; FLUX.1 dev and schnell can be imported.",
    ),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_models_of_other_tasks_are_refused(case: str) -> None:
    name, changes, detail = UNSUPPORTED[case]
    with pytest.raises(CheckpointRefused) as refused:
        detect_checkpoint(_header(real_state(name), **changes), "x.safetensors")
    assert (refused.value.kind, refused.value.detail) == (RefusalKind.UNSUPPORTED, detail)


def test_an_sdxl_refiner_is_refused() -> None:
    refiner = {k: v for k, v in real_state("sdxl-base").items() if not k.startswith("conditioner.")}
    refiner["conditioner.embedders.0.model.token_embedding.weight"] = torch.empty(
        49408, 1280, device="meta"
    )
    tensors = _header(refiner)
    for key, info in list(tensors.items()):
        if key.endswith("attn2.to_k.weight"):
            tensors[key] = dataclasses.replace(info, shape=(info.shape[0], 1280))
    with pytest.raises(
        CheckpointRefused, match=r"is an SDXL refiner .* cannot generate on its own"
    ):
        detect_checkpoint(tensors, "sd_xl_refiner_1.0.safetensors")


def test_parts_that_do_not_fit_together_are_unknown(tmp_path: Path) -> None:
    sd1, sd2 = build_family_pipeline("sd1"), build_family_pipeline("sd2")
    state = original_state_dict(sd1, "sd1", without={"text_encoder"})
    state |= {f"cond_stage_model.transformer.{k}": v for k, v in _text_model(sd2).items()}
    path = save_checkpoint(tmp_path / "franken.safetensors", state, torch.float16)
    with pytest.raises(CheckpointRefused) as refused:
        inspect_checkpoint(path)
    assert refused.value.kind is RefusalKind.UNKNOWN
    assert refused.value.detail == (
        "'franken.safetensors' does not hold together: UNet with 32-wide cross-attention; text "
        "encoder CLIP 48 wide; VAE, but its CLIP text encoders (48 wide) do not add up to the 32 "
        "it reads."
    )


def _text_model(pipeline: Any) -> dict[str, torch.Tensor]:
    return {f"text_model.{k}": v for k, v in pipeline.text_encoder.state_dict().items()}


def test_anything_else_is_unknown_and_malformed_files_are_safetensors_errors(
    tmp_path: Path,
) -> None:
    path = save_checkpoint(
        tmp_path / "embeddings.safetensors", {"emb_params": torch.zeros(4, 768)}, torch.float16
    )
    with pytest.raises(CheckpointRefused) as refused:
        inspect_checkpoint(path)
    assert refused.value.kind is RefusalKind.UNKNOWN
    assert refused.value.detail.startswith(
        "'embeddings.safetensors' is not a model this backend recognises: none of its 1 tensors"
    )
    pickle = tmp_path / "model.safetensors"
    pickle.write_bytes(b"\x80\x04\x95" + bytes(64))
    with pytest.raises(SafetensorsError, match="is a Python pickle"):
        inspect_checkpoint(pickle)
    assert not isinstance(SafetensorsError("x"), CheckpointRefused)
    assert issubclass(CheckpointRefused, ValueError)


def test_the_info_is_frozen() -> None:
    info = detect_checkpoint(header_of(real_state("sd1.5")).tensors, "x.safetensors")
    assert isinstance(info, CheckpointInfo)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.family = F.SDXL  # type: ignore[misc]
