"""Model families: the loaded model from its configs, and LoRAs over all its layers.

The real published architectures (SD 1.5, SD 2.1, SDXL base, SD3 Medium, SD3.5 Large, FLUX.1
dev and schnell) are built from their ``config.json`` values on the ``meta`` device: the real
module layout, no weights. With the tiny family models (``tests/factories/test_family_models``
checks those one by one), a LoRA over every linear layer of each model must be that model's
family, compatible with it and with no model of another family."""

from __future__ import annotations

import json
from functools import cache
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from app.cores.lora_files.base_model import detect_base_model
from app.cores.lora_files.safetensors_file import SafetensorsHeader, TensorInfo
from app.cores.model_manager.model_family import (
    ATTENTION_WIDTHS,
    CROSS_ATTENTION_FAMILIES,
    TRANSFORMER_WIDTHS,
    ModelFamily,
    PipelineDetection,
    detect_pipeline,
    family_from_transformer,
    family_from_unet_config,
    family_of_pipeline,
    incompatibility_message,
    is_compatible,
)
from tests.factories.family_models import FAMILIES, Family, FamilyModelDir

F = ModelFamily

# --- the published configs: each Hub repository's config.json, the keys that shape modules ---

SD15_UNET = json.loads(  # stable-diffusion-v1-5, unet/config.json
    """{"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "norm_num_groups": 32}"""
)
SD21_UNET = SD15_UNET | json.loads(  # stable-diffusion-2-1 (768, v-prediction), unet/config.json
    """{"sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "use_linear_projection": true, "upcast_attention": true}"""
)
SDXL_UNET = json.loads(  # stable-diffusion-xl-base-1.0, unet/config.json
    """{"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
    "use_linear_projection": true, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}"""
)
SD3_MEDIUM = json.loads(  # stable-diffusion-3-medium-diffusers, transformer/config.json
    """{"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
    "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192}"""
)
SD35_LARGE = SD3_MEDIUM | json.loads(  # stable-diffusion-3.5-large, transformer/config.json
    """{"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
    "qk_norm": "rms_norm"}"""
)
FLUX_DEV = json.loads(  # FLUX.1-dev, transformer/config.json
    """{"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": true, "axes_dims_rope": [16, 56, 56]}"""
)
FLUX_SCHNELL = FLUX_DEV | {"guidance_embeds": False}  # FLUX.1-schnell, transformer/config.json
# Text encoders: CLIP ViT-L/14 (SD 1.5, SDXL, SD3, FLUX.1), OpenCLIP ViT-H (SD 2.1), OpenCLIP
# ViT-bigG (SDXL's and SD3's second), T5 v1.1 XXL (SD3's third, FLUX.1's second).
CLIP_L = json.loads(
    """{"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "projection_dim": 768}"""
)
OPENCLIP_H = json.loads(
    """{"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "projection_dim": 512, "hidden_act": "gelu"}"""
)
OPENCLIP_BIGG = json.loads(
    """{"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}"""
)
T5_XXL = json.loads(
    """{"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24}"""
)


def _clip(config: dict[str, Any], projection: bool = False) -> Any:
    model = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config))


def _t5(config: dict[str, Any]) -> Any:
    return T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", **config))


def assemble(pipeline_class: str, **components: Any) -> Any:
    """A stand-in pipeline: an object of a class named like the diffusers one, holding the
    components under the pipeline's attribute names."""
    return type(pipeline_class, (), components)()


REAL: dict[str, F] = {
    "sd1.5": F.SD1,
    "sd2.1": F.SD2,
    "sdxl-base": F.SDXL,
    "sd3-medium": F.SD3,
    "sd3.5-large": F.SD3,
    "flux-dev": F.FLUX,
    "flux-schnell": F.FLUX,
}


@cache
def real_pipeline(name: str) -> Any:
    """The real architecture ``name`` on the meta device (built once per session)."""
    with torch.device("meta"):
        clip_l, t5 = _clip(CLIP_L, projection=name.startswith("sd3")), _t5(T5_XXL)
        if name in ("sd1.5", "sd2.1"):
            unet = UNet2DConditionModel(**(SD15_UNET if name == "sd1.5" else SD21_UNET))
            text = clip_l if name == "sd1.5" else _clip(OPENCLIP_H)
            return assemble("StableDiffusionPipeline", unet=unet, text_encoder=text)
        big_g = _clip(OPENCLIP_BIGG, projection=True)
        if name == "sdxl-base":
            unet = UNet2DConditionModel(**SDXL_UNET)
            return assemble(
                "StableDiffusionXLPipeline", unet=unet, text_encoder=clip_l, text_encoder_2=big_g
            )
        if name.startswith("sd3"):
            sd3 = SD3Transformer2DModel(**(SD3_MEDIUM if name == "sd3-medium" else SD35_LARGE))
            encoders = {"text_encoder": clip_l, "text_encoder_2": big_g, "text_encoder_3": t5}
            return assemble("StableDiffusion3Pipeline", transformer=sd3, **encoders)
        flux = FluxTransformer2DModel(**(FLUX_DEV if name == "flux-dev" else FLUX_SCHNELL))
        return assemble("FluxPipeline", transformer=flux, text_encoder=clip_l, text_encoder_2=t5)


def tiny_pipeline_of(family: Family, family_model_dir: FamilyModelDir) -> Any:
    return DiffusionPipeline.from_pretrained(str(family_model_dir(family)), local_files_only=True)


# ---------------------------------------------------------------------------------------------
# The enum


def test_every_tiny_variant_names_its_architecture() -> None:
    tiny = {family: family.architecture for family in F if family.is_tiny}
    assert tiny == {
        F.TINY: F.SD1,
        F.TINY_SD2: F.SD2,
        F.TINY_SDXL: F.SDXL,
        F.TINY_SD3: F.SD3,
        F.TINY_FLUX: F.FLUX,
    }
    real = [family for family in F if family.known and not family.is_tiny]
    assert real == [F.SD1, F.SD2, F.SDXL, F.SD3, F.FLUX]
    assert all(family.architecture is family for family in real)
    assert F.UNKNOWN.architecture is F.UNKNOWN
    assert F.TINY_SDXL.display_name == "the tiny SDXL test model"
    assert F.TINY.value == "tiny"  # stored in LoRA records and answered by the API
    assert all(family.display_name for family in F)


@pytest.mark.parametrize(
    ("lora", "model", "expected"),
    [
        ("sd1", F.SD1, True),
        ("sdxl", F.SD1, False),
        ("tiny-sdxl", F.TINY_SDXL, True),
        ("sdxl", F.TINY_SDXL, False),
        ("tiny-sdxl", F.SDXL, False),
        ("tiny", F.TINY_SD2, False),
        ("tiny-flux", F.FLUX, False),
        ("unknown", F.SD1, None),
        (None, F.SD1, None),
        ("sd1", F.UNKNOWN, None),
        ("sd1", None, None),
    ],
)
def test_is_compatible(lora: str | None, model: F | None, expected: bool | None) -> None:
    assert is_compatible(lora, model) is expected


def test_incompatibility_message_names_both_families() -> None:
    message = incompatibility_message("detail tweaker", F.SDXL, F.TINY_SDXL)
    assert message.startswith(
        "LoRA 'detail tweaker' was made for SDXL; the loaded model is the tiny SDXL test model."
    )


# ---------------------------------------------------------------------------------------------
# Detection of the loaded model


REAL_EVIDENCE = {
    "sd1.5": "UNet with 768-wide cross-attention; text encoder 768 wide (StableDiffusionPipeline)",
    "sd2.1": "UNet with 1024-wide cross-attention; text encoder 1024 wide "
    "(StableDiffusionPipeline)",
    "sdxl-base": "UNet with 2048-wide cross-attention and text_time conditioning; "
    "text encoders 768 + 1280 wide (StableDiffusionXLPipeline)",
    "sd3-medium": "SD3Transformer2DModel 1536 wide (joint blocks: 24); "
    "text encoders 768 + 1280 + 4096 wide (StableDiffusion3Pipeline)",
    "sd3.5-large": "SD3Transformer2DModel 2432 wide (joint blocks: 38); "
    "text encoders 768 + 1280 + 4096 wide (StableDiffusion3Pipeline)",
    "flux-dev": "FluxTransformer2DModel 3072 wide (double-stream blocks: 19, single-stream: 38) "
    "with guidance embedding (as FLUX.1 dev); text encoders 768 + 4096 wide (FluxPipeline)",
    "flux-schnell": "FluxTransformer2DModel 3072 wide (double-stream blocks: 19, "
    "single-stream: 38) without guidance embedding (as FLUX.1 schnell); "
    "text encoders 768 + 4096 wide (FluxPipeline)",
}


@pytest.mark.parametrize("name", REAL)
def test_each_real_architecture_is_its_family(name: str) -> None:
    pipeline = real_pipeline(name)
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
    assert next(denoiser.parameters()).device.type == "meta"
    detection = detect_pipeline(pipeline)
    assert detection.family is REAL[name]
    assert detection.evidence == REAL_EVIDENCE[name]
    assert family_of_pipeline(pipeline) is REAL[name]


def _linear_widths(module: torch.nn.Module, suffix: str) -> set[tuple[int, int]]:
    return {
        (layer.in_features, layer.out_features)
        for name, layer in module.named_modules()
        if name.endswith(suffix) and isinstance(layer, torch.nn.Linear)
    }


def _check_layout(pipeline: Any, family: F) -> None:
    """The width tables the LoRA rules use hold for this model's actual modules."""
    unet = getattr(pipeline, "unet", None)
    if unet is not None:
        queries = _linear_widths(unet, "attn1.to_q")
        assert {width for width, _ in queries} == ATTENTION_WIDTHS[family]
        contexts = {width for width, _ in _linear_widths(unet, "attn2.to_k")}
        assert [CROSS_ATTENTION_FAMILIES[width] for width in contexts] == [family]
    else:
        queries = _linear_widths(pipeline.transformer, "attn.to_q")
        assert {width for width, _ in queries} <= TRANSFORMER_WIDTHS[family]


@pytest.mark.parametrize("name", REAL)
def test_real_layouts_have_the_widths_the_rules_expect(name: str) -> None:
    _check_layout(real_pipeline(name), REAL[name])


def _configs(**configs: Any) -> dict[str, Any]:
    """Text encoders that only carry a config (all detection reads of them)."""
    return {name: SimpleNamespace(config=config) for name, config in configs.items()}


CASES = (
    "sdxl-with-one-text-encoder",
    "sd1-unet-with-sd2-text-encoder",
    "sdxl-pipeline-with-sd1-unet",
    "sd3-without-t5",
    "flux-with-a-tiny-t5",
    "sd3-of-another-width",
)


def _case(case: str) -> tuple[Any, F, str]:
    """A pipeline whose parts disagree, the family it gets and a part of the evidence."""
    sd1, sdxl, sd3, flux = map(real_pipeline, ("sd1.5", "sdxl-base", "sd3-medium", "flux-dev"))
    if case == "sdxl-with-one-text-encoder":
        text = _configs(text_encoder_2=CLIPTextConfig(**OPENCLIP_BIGG))
        pipeline = assemble("StableDiffusionXLPipeline", unet=sdxl.unet, **text)
        return pipeline, F.UNKNOWN, "but SDXL reads 2 CLIP text encoders; the pipeline has 1"
    if case == "sd1-unet-with-sd2-text-encoder":
        text = _configs(text_encoder=CLIPTextConfig(**OPENCLIP_H))
        pipeline = assemble("StableDiffusionPipeline", unet=sd1.unet, **text)
        return pipeline, F.UNKNOWN, "text encoders (1024 wide) do not add up to the 768 it"
    if case == "sdxl-pipeline-with-sd1-unet":
        unet, text_encoder = sd1.unet, sd1.text_encoder
        pipeline = assemble("StableDiffusionXLPipeline", unet=unet, text_encoder=text_encoder)
        return pipeline, F.UNKNOWN, "(StableDiffusionXLPipeline), but StableDiffusionXLPipeline"
    if case == "sd3-without-t5":
        text = {"text_encoder": sd3.text_encoder, "text_encoder_2": sd3.text_encoder_2}
        pipeline = assemble("StableDiffusion3Pipeline", transformer=sd3.transformer, **text)
        return pipeline, F.SD3, "; text encoders 768 + 1280 wide (StableDiffusion3Pipeline)"
    if case == "flux-with-a-tiny-t5":
        text = _configs(text_encoder=CLIPTextConfig(**CLIP_L), text_encoder_2=T5Config(d_model=64))
        pipeline = assemble("FluxPipeline", transformer=flux.transformer, **text)
        return pipeline, F.UNKNOWN, "but its T5 text encoder is 64 wide, the transformer reads"
    config = SD3_MEDIUM | {"num_attention_heads": 32}
    sd3_2048 = type("SD3Transformer2DModel", (), {"config": config})()
    pipeline = assemble("StableDiffusion3Pipeline", transformer=sd3_2048)
    return pipeline, F.UNKNOWN, "SD3Transformer2DModel 2048 wide; Stable Diffusion 3 is 1536"


@pytest.mark.parametrize("case", CASES)
def test_pipelines_that_contradict_themselves_are_unknown(case: str) -> None:
    pipeline, family, evidence = _case(case)
    detection = detect_pipeline(pipeline)
    assert (detection.family, evidence in detection.evidence) == (family, True), detection


def test_a_pipeline_without_a_denoiser_is_unknown() -> None:
    detection = detect_pipeline(assemble("FluxPipeline", vae=object()))
    assert detection == PipelineDetection(F.UNKNOWN, "no UNet or transformer to read")


@pytest.mark.parametrize(
    ("config", "family"),  # the families' own configs are the models' above
    [
        ({"cross_attention_dim": 2048}, F.UNKNOWN),  # SDXL's width without its conditioning
        ({"cross_attention_dim": 1280, "addition_embed_type": "text_time"}, F.UNKNOWN),  # refiner
        ({"cross_attention_dim": 768, "addition_embed_type": "text_time"}, F.UNKNOWN),
        ({"cross_attention_dim": 64}, F.UNKNOWN),  # the tiny SDXL's width, without text_time
        ({"cross_attention_dim": 32, "addition_embed_type": "text_time"}, F.UNKNOWN),
        ({"cross_attention_dim": [768, 768]}, F.SD1),
        ({"cross_attention_dim": [768, 1024]}, F.UNKNOWN),
        ({}, F.UNKNOWN),
    ],
)
def test_family_from_unet_config(config: dict[str, Any], family: F) -> None:
    assert family_from_unet_config(config) is family


@pytest.mark.parametrize(
    ("class_name", "heads", "head_dim", "family"),
    [
        ("FluxTransformer2DModel", 16, 128, F.UNKNOWN),
        ("SD3Transformer2DModel", 32, 64, F.UNKNOWN),
        ("SD3Transformer2DModel", None, 64, F.UNKNOWN),
        ("PixArtTransformer2DModel", 16, 72, F.UNKNOWN),
    ],
)
def test_family_from_transformer(
    class_name: str, heads: int | None, head_dim: int, family: F
) -> None:
    config = {"num_attention_heads": heads, "attention_head_dim": head_dim}
    assert family_from_transformer(class_name, config) is family


# ---------------------------------------------------------------------------------------------
# Both sides: a LoRA over every linear layer of a model is that model's family


def _peft_header(pipeline: Any) -> SafetensorsHeader:
    """A PEFT LoRA (rank 4) over every linear layer of the denoiser and text encoders, as
    diffusers' training scripts name them; only the header (names and shapes) exists."""
    tensors: dict[str, TensorInfo] = {}
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipeline, component, None)
        if module is None:
            continue
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear):
                down, up = (4, layer.in_features), (layer.out_features, 4)
                tensors[f"{component}.{name}.lora_A.weight"] = TensorInfo("F16", down, (0, 0))
                tensors[f"{component}.{name}.lora_B.weight"] = TensorInfo("F16", up, (0, 0))
    return SafetensorsHeader(tensors=tensors, metadata={}, header_length=0, file_size=0)


_FAMILIES: dict[str, tuple[F, F]] = {}


def _model_families(family_model_dir: FamilyModelDir) -> dict[str, tuple[F, F]]:
    """Each model here: (family of the model, family of a LoRA over all its layers)."""
    if not _FAMILIES:
        models = {name: real_pipeline(name) for name in REAL}
        models |= {f"tiny-{f}": tiny_pipeline_of(f, family_model_dir) for f in FAMILIES}
        for name, pipeline in models.items():
            lora = detect_base_model(_peft_header(pipeline)).family
            _FAMILIES[name] = (family_of_pipeline(pipeline), lora)
    return _FAMILIES


@pytest.mark.parametrize("name", [*REAL, *(f"tiny-{f}" for f in FAMILIES)])
def test_a_lora_over_all_layers_fits_its_model_and_no_other(
    name: str, family_model_dir: FamilyModelDir
) -> None:
    families = _model_families(family_model_dir)
    model, lora = families[name]
    assert lora is model, (name, lora, model)
    assert lora.known
    fits = {other for other, (family, _) in families.items() if is_compatible(lora, family)}
    same = {other for other, (family, _) in families.items() if family is model}
    assert fits == same  # e.g. a FLUX.1 dev LoRA fits schnell, a tiny SDXL one only tiny SDXL
