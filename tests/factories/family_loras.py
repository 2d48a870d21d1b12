"""LoRA files shaped like those made for real model families (SD 1.x, SD 2.x, SDXL, SD3, FLUX.1).

They carry realistic key names and tensor shapes but a tiny rank and only a few layers: just
the layers whose names and widths identify the family (cross-attention key/value input
widths, text-encoder widths, MMDiT block names), so they stay a few kilobytes on disk. They
are for base-model detection and upload tests; none of them fits the tiny embedded model.

Key names, per family and format (what trainers write; see ``diffusers.loaders.
lora_conversion_utils`` for the names diffusers converts):

* SD 1.x / 2.x, Kohya: ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k``
  (cross-attention input 768 / 1024), ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.
* SDXL, Kohya (sd-scripts writes the original SGM block names for SDXL):
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`` (input 2048),
  ``lora_te1_...`` (CLIP-L, 768) and ``lora_te2_...`` (OpenCLIP bigG, 1280).
* SDXL, PEFT: ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight``,
  ``text_encoder.`` / ``text_encoder_2.``.
* SD3, PEFT: ``transformer.transformer_blocks.N.attn.{to_q,add_q_proj}`` (1536 wide), no
  single-stream blocks; Kohya/SAI: ``lora_unet_joint_blocks_0_{x_block,context_block}_attn_qkv``.
* FLUX.1, PEFT: ``transformer.transformer_blocks.N.attn.add_q_proj`` plus
  ``transformer.single_transformer_blocks.N...`` (3072 wide); Kohya/BFL:
  ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

Family = Literal["sd1", "sd2", "sdxl", "sd3", "flux"]
FamilyFormat = Literal["kohya", "peft"]

# (component, module name as the format writes it, dotted; input width, output width)
_Layer = tuple[str, str, int, int]


def _sd_unet(context: int) -> list[_Layer]:
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    return [
        ("unet", f"{block}.attn1.to_q", 320, 320),
        ("unet", f"{block}.attn2.to_k", context, 320),
        ("unet", f"{block}.attn2.to_v", context, 320),
        ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k", context, 320),
    ]


def _clip(component: str, width: int) -> list[_Layer]:
    layer = "text_model.encoder.layers.0"
    return [
        (component, f"{layer}.self_attn.q_proj", width, width),
        (component, f"{layer}.self_attn.out_proj", width, width),
        (component, f"{layer}.mlp.fc1", width, 4 * width),
    ]


_LAYERS: dict[tuple[Family, FamilyFormat], list[_Layer]] = {
    ("sd1", "kohya"): _sd_unet(768) + _clip("text_encoder", 768),
    ("sd1", "peft"): _sd_unet(768) + _clip("text_encoder", 768),
    ("sd2", "kohya"): _sd_unet(1024) + _clip("text_encoder", 1024),
    ("sd2", "peft"): _sd_unet(1024) + _clip("text_encoder", 1024),
    ("sdxl", "kohya"): [
        ("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q", 640, 640),
        ("unet", "input_blocks.4.1.transformer_blocks.0.attn2.to_k", 2048, 640),
        ("unet", "middle_block.1.transformer_blocks.9.attn2.to_v", 2048, 1280),
        *_clip("text_encoder", 768),
        *_clip("text_encoder_2", 1280),
    ],
    ("sdxl", "peft"): [
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640, 640),
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 2048, 640),
        ("unet", "mid_block.attentions.0.transformer_blocks.9.attn2.to_v", 2048, 1280),
        *_clip("text_encoder", 768),
        *_clip("text_encoder_2", 1280),
    ],
    ("sd3", "kohya"): [
        ("unet", "joint_blocks.0.x_block.attn.qkv", 1536, 3 * 1536),
        ("unet", "joint_blocks.0.context_block.attn.qkv", 1536, 3 * 1536),
        ("unet", "joint_blocks.0.x_block.mlp.fc1", 1536, 4 * 1536),
    ],
    ("sd3", "peft"): [
        ("transformer", "transformer_blocks.0.attn.to_q", 1536, 1536),
        ("transformer", "transformer_blocks.0.attn.add_q_proj", 1536, 1536),
        ("transformer", "transformer_blocks.0.attn.to_out.0", 1536, 1536),
        ("transformer", "transformer_blocks.23.attn.to_k", 1536, 1536),
    ],
    ("flux", "kohya"): [
        ("unet", "double_blocks.0.img_attn.qkv", 3072, 3 * 3072),
        ("unet", "double_blocks.0.txt_attn.qkv", 3072, 3 * 3072),
        ("unet", "single_blocks.0.linear1", 3072, 21504),
        ("unet", "single_blocks.37.linear2", 15360, 3072),
        *_clip("text_encoder", 768),
    ],
    ("flux", "peft"): [
        ("transformer", "transformer_blocks.0.attn.to_q", 3072, 3072),
        ("transformer", "transformer_blocks.0.attn.add_q_proj", 3072, 3072),
        ("transformer", "single_transformer_blocks.0.attn.to_q", 3072, 3072),
        ("transformer", "single_transformer_blocks.0.proj_mlp", 3072, 4 * 3072),
    ],
}

_KOHYA_PREFIXES = {
    ("sdxl", "text_encoder"): "lora_te1",
    ("sdxl", "text_encoder_2"): "lora_te2",
    ("flux", "text_encoder"): "lora_te1",
}


def family_layers(
    family: Family, fmt: FamilyFormat = "kohya", *, text_encoders: bool = True
) -> list[_Layer]:
    """The layers :func:`write_family_lora` writes for ``family`` in ``fmt``."""
    layers = _LAYERS[(family, fmt)]
    if not text_encoders:
        layers = [layer for layer in layers if not layer[0].startswith("text_encoder")]
    return layers


def write_family_lora(
    path: Path,
    family: Family,
    *,
    fmt: FamilyFormat = "kohya",
    rank: int = 1,
    alpha: float | None = None,
    text_encoders: bool = True,
    metadata: Mapping[str, str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a small LoRA shaped for ``family`` (fp16 weights, like most published LoRAs)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for component, module, width_in, width_out in family_layers(
        family, fmt, text_encoders=text_encoders
    ):
        down = (torch.randn(rank, width_in, generator=generator) * 0.01).half()
        up = (torch.randn(width_out, rank, generator=generator) * 0.01).half()
        if fmt == "kohya":
            prefix = _KOHYA_PREFIXES.get((family, component))
            if prefix is None:
                prefix = "lora_unet" if component == "unet" else "lora_te"
            stem = f"{prefix}_" + module.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down.contiguous()
            tensors[f"{stem}.lora_up.weight"] = up.contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank if alpha is None else alpha)).half()
        else:
            tensors[f"{component}.{module}.lora_A.weight"] = down.contiguous()
            tensors[f"{component}.{module}.lora_B.weight"] = up.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=dict(metadata or {}))
    return path
