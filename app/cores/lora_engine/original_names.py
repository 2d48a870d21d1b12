"""Module names of the original (non-diffusers) model code, as trainers write them.

Kohya's sd-scripts trains SDXL on the original SGM UNet and FLUX.1/SD3 on the original
BFL/SAI transformers, so their LoRAs name those modules (``input_blocks_4_1_...``,
``double_blocks_0_img_attn_qkv``, ``joint_blocks_0_x_block_attn_qkv``); XLabs names its FLUX
attention processors. Every name here is in underscored form (Kohya's ``.`` -> ``_``), and
maps to diffusers module names of the loaded model, with the fused layers split by rows.

The tables restate the published architectures' correspondence (the same one diffusers'
single-file loaders and ``lora_conversion_utils`` use); the SGM block numbering is derived
from the loaded UNet's own block structure rather than assumed, so it holds for any
``layers_per_block`` and block types.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["OriginalName", "SgmLayout", "flux_name", "sd3_name", "sgm_layout", "sgm_name"]


@dataclass(frozen=True)
class OriginalName:
    """A file module's diffusers counterparts: ``modules`` share the delta's rows in order
    (one module: all rows); ``swap_halves`` when diffusers stores the two halves of an
    adaptive norm's output (shift, scale) the other way round."""

    modules: tuple[str, ...]
    swap_halves: bool = False


def _one(module: str) -> OriginalName:
    return OriginalName((module,))


def _split(prefix: str, names: Sequence[str]) -> OriginalName:
    return OriginalName(tuple(f"{prefix}.{name}" for name in names))


_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

# --- FLUX.1 (BFL names, Kohya's ``lora_unet_`` + BFL names, XLabs processors) ---------------

_FLUX_DOUBLE = {
    "img_attn_qkv": lambda b: _split(f"{b}.attn", _QKV),
    "img_attn_proj": lambda b: _one(f"{b}.attn.to_out.0"),
    "img_mlp_0": lambda b: _one(f"{b}.ff.net.0.proj"),
    "img_mlp_2": lambda b: _one(f"{b}.ff.net.2"),
    "img_mod_lin": lambda b: _one(f"{b}.norm1.linear"),
    "txt_attn_qkv": lambda b: _split(f"{b}.attn", _ADD_QKV),
    "txt_attn_proj": lambda b: _one(f"{b}.attn.to_add_out"),
    "txt_mlp_0": lambda b: _one(f"{b}.ff_context.net.0.proj"),
    "txt_mlp_2": lambda b: _one(f"{b}.ff_context.net.2"),
    "txt_mod_lin": lambda b: _one(f"{b}.norm1_context.linear"),
    "processor_qkv_lora1": lambda b: _split(f"{b}.attn", _QKV),
    "processor_proj_lora1": lambda b: _one(f"{b}.attn.to_out.0"),
    "processor_qkv_lora2": lambda b: _split(f"{b}.attn", _ADD_QKV),
    "processor_proj_lora2": lambda b: _one(f"{b}.attn.to_add_out"),
}
_FLUX_SINGLE = {
    "linear1": lambda b: _split(b, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    "linear2": lambda b: _one(f"{b}.proj_out"),
    "modulation_lin": lambda b: _one(f"{b}.norm.linear"),
    "processor_qkv_lora": lambda b: _split(f"{b}.attn", _QKV),
    "processor_proj_lora": lambda b: _one(f"{b}.proj_out"),
}
_FLUX_TOP = {
    "img_in": _one("x_embedder"),
    "txt_in": _one("context_embedder"),
    "time_in_in_layer": _one("time_text_embed.timestep_embedder.linear_1"),
    "time_in_out_layer": _one("time_text_embed.timestep_embedder.linear_2"),
    "vector_in_in_layer": _one("time_text_embed.text_embedder.linear_1"),
    "vector_in_out_layer": _one("time_text_embed.text_embedder.linear_2"),
    "guidance_in_in_layer": _one("time_text_embed.guidance_embedder.linear_1"),
    "guidance_in_out_layer": _one("time_text_embed.guidance_embedder.linear_2"),
    "final_layer_linear": _one("proj_out"),
    "final_layer_adaLN_modulation_1": OriginalName(("norm_out.linear",), swap_halves=True),
}
_FLUX_BLOCK = re.compile(r"^(double|single)_blocks_(\d+)_(.+)$")


def flux_name(name: str) -> OriginalName | None:
    """A BFL/Kohya/XLabs FLUX.1 module name (underscored) in diffusers'
    ``FluxTransformer2DModel``."""
    if name in _FLUX_TOP:
        return _FLUX_TOP[name]
    match = _FLUX_BLOCK.match(name)
    if match is None:
        return None
    kind, index, rest = match.groups()
    if kind == "double":
        double = _FLUX_DOUBLE.get(rest)
        return double(f"transformer_blocks.{index}") if double else None
    single = _FLUX_SINGLE.get(rest)
    return single(f"single_transformer_blocks.{index}") if single else None


# --- Stable Diffusion 3 (SAI names, as sd-scripts writes them) ------------------------------

_SD3_STREAMS = {
    "x_block": ("attn", _QKV, "to_out.0", "ff", "norm1"),
    "context_block": ("attn", _ADD_QKV, "to_add_out", "ff_context", "norm1_context"),
}
_SD3_BLOCK = re.compile(r"^joint_blocks_(\d+)_(x_block|context_block)_(.+)$")
_SD3_TOP = {
    "x_embedder_proj": _one("pos_embed.proj"),
    "context_embedder": _one("context_embedder"),
    "t_embedder_mlp_0": _one("time_text_embed.timestep_embedder.linear_1"),
    "t_embedder_mlp_2": _one("time_text_embed.timestep_embedder.linear_2"),
    "y_embedder_mlp_0": _one("time_text_embed.text_embedder.linear_1"),
    "y_embedder_mlp_2": _one("time_text_embed.text_embedder.linear_2"),
    "final_layer_linear": _one("proj_out"),
    "final_layer_adaLN_modulation_1": OriginalName(("norm_out.linear",), swap_halves=True),
}


def sd3_name(name: str, last_block: int) -> OriginalName | None:
    """An SAI SD3 module name (underscored) in diffusers' ``SD3Transformer2DModel``.
    ``last_block``: the last joint block, whose text stream ends in a continuous norm."""
    if name in _SD3_TOP:
        return _SD3_TOP[name]
    match = _SD3_BLOCK.match(name)
    if match is None:
        return None
    index, stream, rest = match.groups()
    attn, qkv, out, ff, norm = _SD3_STREAMS[stream]
    block = f"transformer_blocks.{index}"
    table = {
        "attn_qkv": _split(f"{block}.{attn}", qkv),
        "attn_proj": _one(f"{block}.{attn}.{out}"),
        "attn2_qkv": _split(f"{block}.attn2", _QKV),
        "attn2_proj": _one(f"{block}.attn2.to_out.0"),
        "mlp_fc1": _one(f"{block}.{ff}.net.0.proj"),
        "mlp_fc2": _one(f"{block}.{ff}.net.2"),
        "adaLN_modulation_1": OriginalName(
            (f"{block}.{norm}.linear",),
            swap_halves=stream == "context_block" and int(index) == last_block,
        ),
    }
    return table.get(rest)


# --- SDXL (SGM UNet names) -----------------------------------------------------------------

_SGM_TOP = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "out_0": "conv_norm_out",
    "out_2": "conv_out",
}
_SGM_RESNET = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "emb_layers_1": "time_emb_proj",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "skip_connection": "conv_shortcut",
}
_SGM_IO = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)(?:_(.+))?$")
_SGM_MIDDLE = re.compile(r"^middle_block_(\d+)(?:_(.+))?$")


SgmLayout = dict[tuple[str, int, int], tuple[str, str]]


def sgm_layout(unet: Any) -> SgmLayout:
    """(SGM block list, index, position) -> (diffusers module prefix, module kind) for the
    loaded UNet: SGM lists each down block's layers (resnet[, attention]) then its
    downsampler as separate entries, each up block's ``layers + 1`` layers with the
    upsampler inside the last one, and the middle block as resnet, attention, resnet."""
    layout: dict[tuple[str, int, int], tuple[str, str]] = {}
    index = 1
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for layer in range(len(block.resnets)):
            layout["input_blocks", index, 0] = (f"down_blocks.{b}.resnets.{layer}", "resnet")
            if attentions:
                layout["input_blocks", index, 1] = (f"down_blocks.{b}.attentions.{layer}", "")
            index += 1
        if getattr(block, "downsamplers", None):
            layout["input_blocks", index, 0] = (f"down_blocks.{b}.downsamplers.0", "down")
            index += 1
    mid = unet.mid_block
    if mid is not None:
        layout["middle_block", 0, 0] = ("mid_block.resnets.0", "resnet")
        if getattr(mid, "attentions", None):
            layout["middle_block", 1, 0] = ("mid_block.attentions.0", "")
            layout["middle_block", 2, 0] = ("mid_block.resnets.1", "resnet")
        else:
            layout["middle_block", 1, 0] = ("mid_block.resnets.1", "resnet")
    index = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        count = len(block.resnets)
        for layer in range(count):
            layout["output_blocks", index, 0] = (f"up_blocks.{b}.resnets.{layer}", "resnet")
            position = 1
            if attentions:
                layout["output_blocks", index, 1] = (f"up_blocks.{b}.attentions.{layer}", "")
                position = 2
            if layer == count - 1 and getattr(block, "upsamplers", None):
                layout["output_blocks", index, position] = (f"up_blocks.{b}.upsamplers.0", "up")
            index += 1
    return layout


def sgm_name(name: str, layout: SgmLayout) -> str | None:
    """An SGM UNet module name (underscored) as the loaded diffusers UNet's module name, also
    underscored (attention blocks' inner names are diffusers' own and stay as the file has
    them)."""
    if name in _SGM_TOP:
        return _SGM_TOP[name].replace(".", "_")
    io = _SGM_IO.match(name)
    middle = _SGM_MIDDLE.match(name)
    if io is not None:
        blocks, index, position, rest = io.groups()
    elif middle is not None:
        blocks, index, position, rest = "middle_block", middle[1], "0", middle[2]
    else:
        return None
    found = layout.get((blocks, int(index), int(position)))
    if found is None:
        return None
    prefix, kind = found
    inner = {
        "resnet": _SGM_RESNET.get(rest or ""),
        "down": "conv" if rest == "op" else None,
        "up": "conv" if rest == "conv" else None,
        "": rest,
    }[kind]
    if inner is None:
        return None
    return f"{prefix}.{inner}".replace(".", "_")
