"""Tiny offline models of each family the backend runs, at the real diffusers pipeline classes.

The one factory of family models for the whole suite: SD 1.x, SD 2.x (v-prediction), SDXL,
SD3 / 3.5 and FLUX.1 dev and schnell. Each is built from configs with seeded weights and saved
as an ordinary diffusers folder (``save_pretrained(folder, safe_serialization=True)``), so
``DiffusionPipeline.from_pretrained(folder)`` picks the right class from ``model_index.json``
and runs the real pipeline code; a 64x64 image in two steps takes well under a second on a
CPU. Nothing is downloaded: the CLIP tokenizers are the embedded model's byte-level one, the
T5 tokenizer a character-level Unigram one built here.

Seeded: the same family and seed write the same bytes; the global torch RNG state is left
untouched. The shapes follow the real models where the pipelines care (latent channels, VAE
scale factor 8, FLUX's 2x2 latent packing, SD3's concatenated CLIP + T5 context, v-prediction)
and are tiny elsewhere; in particular the text widths (the UNets' cross-attention widths) are
not the real ones:

===============  ==========================================================================
``sd1``          the embedded model's architecture (CLIP 32 wide), freshly initialised
``sd2``          CLIP 48 wide ("gelu" as OpenCLIP-H), linear projections, DDIM v-prediction
``sdxl``         two CLIP encoders of 32 (cross-attention 64), ``text_time`` conditioning
``sd3``          two CLIP encoders with projection (32 each, pooled 64) + T5 64 wide, MMDiT
``flux-dev``     CLIP 32 (pooled) + T5 64, guidance embedding, dynamically shifted sigmas
``flux-schnell`` as dev, without guidance embedding, shift 1.0
===============  ==========================================================================
"""

from __future__ import annotations

import string
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,  # transformers 5's T5TokenizerFast is an alias of it, and untyped
)

from app.cores.model_manager.embedded_model import build_embedded_model, write_tokenizer

Family = Literal["sd1", "sd2", "sdxl", "sd3", "flux-dev", "flux-schnell"]
FAMILIES: tuple[Family, ...] = get_args(Family)

PIPELINE_CLASSES: dict[Family, str] = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}
"""The pipeline class each family's ``model_index.json`` names."""

SD2_TEXT_WIDTH = 48
SDXL_TEXT_WIDTH = 32  # each SDXL text encoder; the UNet attends to both, concatenated
SDXL_TIME_EMBED_DIM = 8  # SDXL adds 6 time ids (sizes, crop, target) embedded at this width
CLIP_WIDTH = 32  # SD3's and FLUX's CLIP encoders
T5_WIDTH = 64  # SD3's and FLUX's T5 encoder: the transformers' joint_attention_dim
T5_MAX_LENGTH = 512

_CLIP_VOCAB = 514  # the byte-level tokenizer's size, ids 512/513 = start/end


class FamilyModelDir(Protocol):
    """The session fixture ``family_model_dir``: each family's folder, built once per seed."""

    def __call__(self, family: Family, seed: int = 0) -> Path: ...


def write_family_model(family: Family, folder: Path, seed: int = 0) -> Path:
    """Write the tiny ``family`` model to ``folder`` as a diffusers folder; returns ``folder``."""
    pipeline = build_family_pipeline(family, seed)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return folder


def build_family_pipeline(family: Family, seed: int = 0) -> Any:
    """The tiny ``family`` pipeline in memory (float32, CPU), its weights drawn from ``seed``."""
    builder = _BUILDERS[family]
    # Module constructors draw from the global generator: seed it inside a fork.
    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(Path(scratch))


# --- tokenizers ---------------------------------------------------------------------------


def _clip_tokenizer(scratch: Path) -> CLIPTokenizer:
    folder = scratch / "clip-tokenizer"
    if not folder.exists():
        write_tokenizer(folder)  # the embedded model's offline byte-level tokenizer
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(str(folder))
    return tokenizer


def write_t5_tokenizer(folder: Path) -> None:
    """A character-level T5 tokenizer (Unigram, as T5's): ASCII encodes, the rest is ``<unk>``.

    Ids 0/1/2 are ``<pad>``/``</s>``/``<unk>`` as in T5; ``</s>`` ends every sequence.
    """
    characters = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0)]
    pieces += [("▁" + character, -3.0) for character in characters]
    pieces += [(character, -4.0) for character in characters]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))


def _t5_tokenizer(scratch: Path) -> T5Tokenizer:
    folder = scratch / "t5-tokenizer"
    if not folder.exists():
        write_t5_tokenizer(folder)
    tokenizer: T5Tokenizer = T5Tokenizer.from_pretrained(str(folder))
    return tokenizer


# --- shared parts -------------------------------------------------------------------------


def _clip_config(width: int, *, hidden_act: str = "quick_gelu") -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=_CLIP_VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        projection_dim=width,
    )


def _t5_encoder(vocab_size: int) -> T5EncoderModel:
    # T5 v1.1 (gated GELU, no tied embeddings) as SD3 and FLUX use, tiny. T5Config takes
    # ``tie_word_embeddings`` and ``decoder_start_token_id`` through the ``**kwargs`` its
    # dataclass accepts at runtime but does not declare to type checkers.
    return T5EncoderModel(
        T5Config(  # type: ignore[call-arg]
            vocab_size=vocab_size,
            d_model=T5_WIDTH,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _vae(*, latent_channels: int, **config: Any) -> AutoencoderKL:
    # Four blocks give the usual scale factor of 8 between pixels and latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        **config,
    )


def _flow_vae(*, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """SD3's and FLUX's VAE: 16 latent channels, shifted and scaled, no quant convs."""
    return _vae(
        latent_channels=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


# --- the families -------------------------------------------------------------------------


def _sd1(scratch: Path) -> StableDiffusionPipeline:
    """The embedded model's architecture and scheduler, every weight drawn afresh."""
    with torch.random.fork_rng(devices=[]):  # the embedded build seeds the global generator
        source = build_embedded_model(scratch / "embedded")
    template = StableDiffusionPipeline.from_pretrained(str(source), local_files_only=True)
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(_architecture(template.vae.config)),
        text_encoder=CLIPTextModel(template.text_encoder.config),
        tokenizer=template.tokenizer,
        unet=UNet2DConditionModel.from_config(_architecture(template.unet.config)),
        scheduler=template.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers model config without the private keys loading adds (``_name_or_path``, the
    scratch folder, would otherwise be saved and make the bytes differ between builds)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _sd2(scratch: Path) -> StableDiffusionPipeline:
    """SD 2.1-shaped: OpenCLIP-like text encoder, linear projections, per-block head counts,
    upcast attention, and the DDIM v-prediction scheduler SD 2.1 ships."""
    tokenizer = _clip_tokenizer(scratch)
    return StableDiffusionPipeline(
        vae=_vae(latent_channels=4),
        text_encoder=CLIPTextModel(_clip_config(SD2_TEXT_WIDTH, hidden_act="gelu")),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
            cross_attention_dim=SD2_TEXT_WIDTH,
            norm_num_groups=8,
        ),
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(scratch: Path) -> StableDiffusionXLPipeline:
    """SDXL-shaped: two text encoders (the second with projection), ``text_time`` conditioning."""
    tokenizer = _clip_tokenizer(scratch)
    return StableDiffusionXLPipeline(
        vae=_vae(latent_channels=4, scaling_factor=0.13025),  # SDXL's
        text_encoder=CLIPTextModel(_clip_config(SDXL_TEXT_WIDTH)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(SDXL_TEXT_WIDTH)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=2 * SDXL_TEXT_WIDTH,
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            # pooled text_embeds of text_encoder_2 + 6 time ids, each embedded
            projection_class_embeddings_input_dim=SDXL_TEXT_WIDTH + 6 * SDXL_TIME_EMBED_DIM,
            norm_num_groups=8,
        ),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
        ),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _sd3(scratch: Path) -> StableDiffusion3Pipeline:
    """SD3-shaped MMDiT: the CLIP-L and CLIP-G stand-ins' hidden states side by side (64, zero
    padded to T5's width) join T5's; their pooled projections (32 + 32) condition the blocks."""
    clip_tokenizer = _clip_tokenizer(scratch)
    t5_tokenizer = _t5_tokenizer(scratch)
    heads, head_dim = 4, 8
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8,  # latents of a 64x64 image: the pipeline's default size
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=T5_WIDTH,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=2 * CLIP_WIDTH,
            pos_embed_max_size=32,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_flow_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(_clip_config(CLIP_WIDTH)),
        tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(CLIP_WIDTH, hidden_act="gelu")),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=_t5_encoder(len(t5_tokenizer)),
        tokenizer_3=t5_tokenizer,
    )


def _flux(scratch: Path, *, dev: bool) -> FluxPipeline:
    """FLUX.1-shaped: 16 latent channels packed 2x2 into 64, T5 tokens as context, CLIP's pooled
    output as the global vector; dev embeds the guidance scale and shifts sigmas by image size."""
    clip_tokenizer = _clip_tokenizer(scratch)
    t5_tokenizer = _t5_tokenizer(scratch)
    if dev:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=1.0,
            use_dynamic_shifting=False,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_flow_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(_clip_config(CLIP_WIDTH)),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5_encoder(len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels x 2x2 packing
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=CLIP_WIDTH,
            guidance_embeds=dev,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        ),
    )


_BUILDERS: dict[Family, Callable[[Path], Any]] = {
    "sd1": _sd1,
    "sd2": _sd2,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux-dev": lambda scratch: _flux(scratch, dev=True),
    "flux-schnell": lambda scratch: _flux(scratch, dev=False),
}
