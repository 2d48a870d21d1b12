"""LoRA files shaped like those made for each model family (SD 1.x, SD 2.x, SDXL, SD3, FLUX.1),
at the real models' widths or at the tiny test models' (``size="tiny"``).

They carry realistic key names and tensor shapes but a tiny rank and only a few layers: just
the layers whose names and widths identify the family (cross-attention key/value input
widths, text-encoder widths, MMDiT block names), so they stay a few kilobytes on disk. They
are for base-model detection and upload tests; the real-size ones fit no test model, and the
tiny ones are shaped like (but not necessarily loadable into) the tiny family models of
``tests.factories.family_models`` (``tiny`` for SD 1.x: the embedded model's widths).

Key names, per family and format (what trainers write; see ``diffusers.loaders.
lora_conversion_utils`` for the names diffusers converts):

* SD 1.x / 2.x, Kohya: ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k``
  (cross-attention input 768 / 1024), ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.
* SDXL, Kohya (sd-scripts writes the original SGM block names for SDXL):
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`` (input 2048),
  ``lora_te1_...`` (CLIP-L, 768) and ``lora_te2_...`` (OpenCLIP bigG, 1280). LyCORIS LoHa
  and LoKr use the same names with ``.hada_w1_a``... / ``.lokr_w1``, ``.lokr_w2_a``... tensors.
* SDXL, PEFT: ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight``,
  ``text_encoder.`` / ``text_encoder_2.``.
* SD3, PEFT: ``transformer.transformer_blocks.N.attn.{to_q,add_q_proj}`` (1536 wide), no
  single-stream blocks; Kohya/SAI: ``lora_unet_joint_blocks_0_{x_block,context_block}_attn_qkv``.
* FLUX.1, PEFT: ``transformer.transformer_blocks.N.attn.add_q_proj`` plus
  ``transformer.single_transformer_blocks.N...`` (3072 wide); Kohya (BFL module names):
  ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``, with T5
  layers ``lora_te3_encoder_block_0_layer_0_SelfAttention_q`` (4096 wide) in ``kohya_t5``;
  BFL: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``; XLabs:
  ``double_blocks.0.processor.{qkv,proj}_lora{1,2}.down.weight`` (1: image, 2: text stream),
  ``single_blocks.0.processor.qkv_lora.down.weight``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from app.cores.model_manager.model_family import TINY_CROSS_ATTENTION_DIM, TINY_TRANSFORMER_WIDTH
from tests.factories.family_models import CLIP_WIDTH, SD2_TEXT_WIDTH, SDXL_TEXT_WIDTH, T5_WIDTH

Family = Literal["sd1", "sd2", "sdxl", "sd3", "flux"]
FamilyFormat = Literal["kohya", "peft", "kohya_t5", "bfl", "xlabs", "loha", "lokr"]
Size = Literal["real", "tiny"]

FORMATS: dict[Family, tuple[FamilyFormat, ...]] = {
    "sd1": ("kohya", "peft"),
    "sd2": ("kohya", "peft"),
    "sdxl": ("kohya", "peft", "loha", "lokr"),
    "sd3": ("kohya", "peft"),
    "flux": ("kohya", "peft", "kohya_t5", "bfl", "xlabs"),
}
"""The formats :func:`write_family_lora` writes for each family."""

# (component, module name as the format writes it, dotted; input width, output width)
_Layer = tuple[str, str, int, int]


@dataclass(frozen=True)
class _Widths:
    unet: tuple[int, int]
    """SD 1.x/2.x attention widths: first block and mid block (320/1280; tiny 32/64)."""
    sdxl: tuple[int, int]
    """SDXL attention widths (640/1280; the tiny SDXL attends at 64 only)."""
    sd1_text: int
    sd2_text: int
    sdxl_text: tuple[int, int]
    """CLIP-L and OpenCLIP bigG (768, 1280); the tiny SDXL's two CLIPs."""
    clip_l: int
    """SD3's and FLUX.1's CLIP-L (768; tiny 32)."""
    sd3: int
    flux: int
    t5: tuple[int, int]
    """T5 width and feed-forward width (4096, 10240; tiny 64, 128)."""
    sdxl_attention_block: str
    """SGM index of the first SDXL attention block (``input_blocks.4.1``; tiny ``3.1``)."""
    deep: int
    """A transformer-block index that exists (SDXL's mid block has 10; the tiny one 1)."""
    last_sd3: int
    last_single: int


_REAL = _Widths(
    unet=(320, 1280),
    sdxl=(640, 1280),
    sd1_text=768,
    sd2_text=1024,
    sdxl_text=(768, 1280),
    clip_l=768,
    sd3=1536,
    flux=3072,
    t5=(4096, 10240),
    sdxl_attention_block="input_blocks.4.1",
    deep=9,
    last_sd3=23,
    last_single=37,
)
_TINY = _Widths(
    unet=(32, 64),  # the tiny UNets' block_out_channels
    sdxl=(64, 64),
    sd1_text=TINY_CROSS_ATTENTION_DIM,
    sd2_text=SD2_TEXT_WIDTH,
    sdxl_text=(SDXL_TEXT_WIDTH, SDXL_TEXT_WIDTH),
    clip_l=CLIP_WIDTH,
    sd3=TINY_TRANSFORMER_WIDTH,
    flux=TINY_TRANSFORMER_WIDTH,
    t5=(T5_WIDTH, 2 * T5_WIDTH),  # d_ff of the tiny T5
    sdxl_attention_block="input_blocks.3.1",  # one resnet per block, then a downsample
    deep=0,
    last_sd3=1,
    last_single=0,
)


def _sd_unet(w: _Widths, context: int) -> list[_Layer]:
    first, last = w.unet
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    return [
        ("unet", f"{block}.attn1.to_q", first, first),
        ("unet", f"{block}.attn2.to_k", context, first),
        ("unet", f"{block}.attn2.to_v", context, first),
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", context, last),
    ]


def _clip(component: str, width: int) -> list[_Layer]:
    layer = "text_model.encoder.layers.0"
    return [
        (component, f"{layer}.self_attn.q_proj", width, width),
        (component, f"{layer}.self_attn.out_proj", width, width),
        (component, f"{layer}.mlp.fc1", width, 4 * width),
    ]


def _sdxl(w: _Widths, fmt: FamilyFormat) -> list[_Layer]:
    low, high = w.sdxl
    context = sum(w.sdxl_text)
    if fmt == "peft":
        first = "down_blocks.1.attentions.0.transformer_blocks.0"
        deep = f"mid_block.attentions.0.transformer_blocks.{w.deep}"
    else:
        first = f"{w.sdxl_attention_block}.transformer_blocks.0"
        deep = f"middle_block.1.transformer_blocks.{w.deep}"
    return [
        ("unet", f"{first}.attn1.to_q", low, low),
        ("unet", f"{first}.attn2.to_k", context, low),
        ("unet", f"{deep}.attn2.to_v", context, high),
        *_clip("text_encoder", w.sdxl_text[0]),
        *_clip("text_encoder_2", w.sdxl_text[1]),
    ]


def _sd3(w: _Widths, fmt: FamilyFormat) -> list[_Layer]:
    d = w.sd3
    if fmt == "kohya":
        return [
            ("unet", "joint_blocks.0.x_block.attn.qkv", d, 3 * d),
            ("unet", "joint_blocks.0.context_block.attn.qkv", d, 3 * d),
            ("unet", "joint_blocks.0.x_block.mlp.fc1", d, 4 * d),
        ]
    return [
        ("transformer", "transformer_blocks.0.attn.to_q", d, d),
        ("transformer", "transformer_blocks.0.attn.add_q_proj", d, d),
        ("transformer", "transformer_blocks.0.attn.to_out.0", d, d),
        ("transformer", f"transformer_blocks.{w.last_sd3}.attn.to_k", d, d),
    ]


def _flux(w: _Widths, fmt: FamilyFormat) -> list[_Layer]:
    d = w.flux
    if fmt == "peft":
        return [
            ("transformer", "transformer_blocks.0.attn.to_q", d, d),
            ("transformer", "transformer_blocks.0.attn.add_q_proj", d, d),
            ("transformer", "single_transformer_blocks.0.attn.to_q", d, d),
            ("transformer", "single_transformer_blocks.0.proj_mlp", d, 4 * d),
        ]
    if fmt == "xlabs":
        return [
            ("", "double_blocks.0.processor.qkv_lora1", d, 3 * d),
            ("", "double_blocks.0.processor.proj_lora1", d, d),
            ("", "double_blocks.0.processor.qkv_lora2", d, 3 * d),
            ("", "double_blocks.0.processor.proj_lora2", d, d),
            ("", "single_blocks.0.processor.qkv_lora", d, 3 * d),
        ]
    component = "diffusion_model" if fmt == "bfl" else "unet"
    layers = [
        (component, "double_blocks.0.img_attn.qkv", d, 3 * d),
        (component, "double_blocks.0.txt_attn.qkv", d, 3 * d),
        (component, "single_blocks.0.linear1", d, 7 * d),  # qkv and the 4x MLP, fused
        (component, f"single_blocks.{w.last_single}.linear2", 5 * d, d),
    ]
    if fmt == "bfl":
        return layers
    layers += _clip("text_encoder", w.clip_l)
    if fmt == "kohya_t5":
        t5, ff = w.t5
        block = "encoder.block.0.layer"
        layers += [
            ("text_encoder_3", f"{block}.0.SelfAttention.q", t5, t5),
            ("text_encoder_3", f"{block}.0.SelfAttention.o", t5, t5),
            ("text_encoder_3", f"{block}.1.DenseReluDense.wi_0", t5, ff),
            ("text_encoder_3", f"{block}.1.DenseReluDense.wo", ff, t5),
        ]
    return layers


def family_layers(
    family: Family,
    fmt: FamilyFormat = "kohya",
    *,
    size: Size = "real",
    text_encoders: bool = True,
) -> list[_Layer]:
    """The layers :func:`write_family_lora` writes for ``family`` in ``fmt``."""
    if fmt not in FORMATS[family]:
        raise ValueError(f"no {fmt} files for {family}")
    w = _REAL if size == "real" else _TINY
    if family == "sd1":
        layers = _sd_unet(w, w.sd1_text) + _clip("text_encoder", w.sd1_text)
    elif family == "sd2":
        layers = _sd_unet(w, w.sd2_text) + _clip("text_encoder", w.sd2_text)
    elif family == "sdxl":
        layers = _sdxl(w, fmt)
    elif family == "sd3":
        layers = _sd3(w, fmt)
    else:
        layers = _flux(w, fmt)
    if not text_encoders:
        layers = [layer for layer in layers if not layer[0].startswith("text_encoder")]
    return layers


_KOHYA_PREFIXES = {
    ("sdxl", "text_encoder"): "lora_te1",
    ("sdxl", "text_encoder_2"): "lora_te2",
    ("flux", "text_encoder"): "lora_te1",
    ("flux", "text_encoder_3"): "lora_te3",  # sd-scripts' T5 prefix for FLUX.1 (as for SD3)
}


def _factor(n: int) -> int:
    """The largest divisor of ``n`` up to its square root (LyCORIS splits LoKr dims so)."""
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def _layer_tensors(
    fmt: FamilyFormat, width_in: int, width_out: int, rank: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One layer's tensors by role suffix (fp16, like most published files)."""

    def draw(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.01).half().contiguous()

    if fmt == "loha":
        return {
            "hada_w1_a": draw(width_out, rank),
            "hada_w1_b": draw(rank, width_in),
            "hada_w2_a": draw(width_out, rank),
            "hada_w2_b": draw(rank, width_in),
        }
    if fmt == "lokr":
        # kron(w1, w2) is (a*c) x (b*d): a small full w1, a low-rank w2.
        a, b = _factor(width_out), _factor(width_in)
        c, d = width_out // a, width_in // b
        return {
            "lokr_w1": draw(a, b),
            "lokr_w2_a": draw(c, rank),
            "lokr_w2_b": draw(rank, d),
        }
    down, up = draw(rank, width_in), draw(width_out, rank)
    if fmt == "xlabs":
        return {"down.weight": down, "up.weight": up}
    if fmt in ("peft", "bfl"):
        return {"lora_A.weight": down, "lora_B.weight": up}
    return {"lora_down.weight": down, "lora_up.weight": up}


def write_family_lora(
    path: Path,
    family: Family,
    *,
    fmt: FamilyFormat = "kohya",
    size: Size = "real",
    rank: int = 1,
    alpha: float | None = None,
    text_encoders: bool = True,
    metadata: Mapping[str, str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a small LoRA shaped for ``family`` at the real or the tiny models' widths."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for component, module, width_in, width_out in family_layers(
        family, fmt, size=size, text_encoders=text_encoders
    ):
        if fmt in ("kohya", "kohya_t5", "loha", "lokr"):
            prefix = _KOHYA_PREFIXES.get((family, component))
            if prefix is None:
                prefix = "lora_unet" if component == "unet" else "lora_te"
            stem = f"{prefix}_" + module.replace(".", "_")
        else:
            stem = f"{component}.{module}" if component else module
        for role, tensor in _layer_tensors(fmt, width_in, width_out, rank, generator).items():
            tensors[f"{stem}.{role}"] = tensor
        if fmt not in ("peft", "bfl", "xlabs"):
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank if alpha is None else alpha)).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=dict(metadata or {}))
    return path
