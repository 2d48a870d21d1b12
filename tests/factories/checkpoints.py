"""Single-file checkpoints in the original key layout, written from the tiny diffusers models.

CivitAI checkpoints are one ``.safetensors`` file in the layout of the code each family was
released with (CompVis/Stability LDM and SGM for SD 1.x/2.x/SDXL, SAI's MMDiT for SD3, Black
Forest Labs' for FLUX.1), as A1111 and ComfyUI save them. This factory writes that layout from
a diffusers pipeline: the tiny models of ``family_models`` (so a test can load the file and
compare images with the folder it came from) or real architectures on the ``meta`` device (key
names and shapes only, for header-only files). The map is this module's own, the inverse of
what diffusers 0.42's ``loaders/single_file_utils.py`` reads:

* UNet, prefix ``model.diffusion_model.``: ``input_blocks.N.0`` (resnet: ``in_layers.0/2``,
  ``emb_layers.1``, ``out_layers.0/3``, ``skip_connection``) and ``.1`` (attention, diffusers'
  own inner names), ``input_blocks.N.0.op`` (downsampler), ``middle_block.0/1/2``,
  ``output_blocks.N.0/1`` with the upsampler at ``.1.conv`` or ``.2.conv``, ``time_embed.0/2``,
  ``label_emb.0.0/2`` (SDXL), ``out.0/2``; N counts ``layers_per_block + 1`` slots per block.
* VAE, ``first_stage_model.`` (``vae.`` in ComfyUI's FLUX files): ``encoder.down.I.block.J``,
  ``decoder.up.I.block.J`` numbered from the bottom (diffusers counts up blocks from the top),
  ``mid.block_1/2``, ``mid.attn_1.{norm,q,k,v,proj_out}`` as 1x1 convolutions, ``norm_out``.
* Text encoders: Hugging Face CLIP under ``cond_stage_model.transformer.`` (SD 1.x),
  ``conditioner.embedders.0.transformer.`` (SDXL), ``text_encoders.clip_l/clip_g.transformer.``
  (SD3, FLUX.1), always with ``text_model.``; OpenCLIP under ``cond_stage_model.model.`` (SD
  2.x) and ``conditioner.embedders.1.model.`` (SDXL): ``transformer.resblocks.I`` with q, k, v
  stacked in ``attn.in_proj_weight``, ``text_projection`` stored transposed; T5 under
  ``text_encoders.t5xxl.transformer.``.
* SD3: ``joint_blocks.I.{x_block,context_block}`` with ``attn.qkv`` stacked, ``adaLN_modulation.1``
  (the last context block's, and ``final_layer``'s, halves swapped: SAI writes shift, scale),
  ``x_embedder``, ``pos_embed``, ``t_embedder``, ``y_embedder``, ``context_embedder``.
* FLUX.1: ``double_blocks.I.{img,txt}_{attn,mlp,mod}``, ``single_blocks.I.linear1`` (q, k, v and
  the MLP input stacked), ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in`` (dev).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from app.cores.lora_files.safetensors_file import SafetensorsHeader, TensorInfo
from tests.factories.family_loras import write_family_lora
from tests.factories.family_models import Family, build_family_pipeline

Layout = Literal["sd1", "sd2", "sdxl", "sd3", "flux"]
LAYOUTS: dict[Family, Layout] = {
    "sd1": "sd1",
    "sd2": "sd2",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "flux-dev": "flux",
    "flux-schnell": "flux",
}
UNET = "model.diffusion_model."
_HF, _OPENCLIP, _T5 = "hf", "openclip", "t5"
_CLIP_L, _T5XXL = (
    ("text_encoders.clip_l.transformer.", _HF),
    ("text_encoders.t5xxl.transformer.", _T5),
)
TEXT_PREFIXES: dict[Layout, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", _HF)},
    "sd2": {"text_encoder": ("cond_stage_model.model.", _OPENCLIP)},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", _HF),
             "text_encoder_2": ("conditioner.embedders.1.model.", _OPENCLIP)},
    "sd3": {"text_encoder": _CLIP_L, "text_encoder_2": ("text_encoders.clip_g.transformer.", _HF),
            "text_encoder_3": _T5XXL},
    "flux": {"text_encoder": _CLIP_L, "text_encoder_2": _T5XXL},
}  # fmt: skip
"""Where each family's files keep each text encoder, and in which layout."""

Tensors = dict[str, torch.Tensor]


def _renamed(state: Mapping[str, torch.Tensor], rename: Callable[[str], str]) -> Tensors:
    return {rename(key): tensor for key, tensor in state.items()}


# --- UNet ------------------------------------------------------------------------------------

_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}  # fmt: skip
_UNET_FIXED = {
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
}  # fmt: skip
_BLOCK = re.compile(r"^(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(\w+)\.(\d+)\.(.*)$")


def _resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_RESNET[layer]}.{tail}"


def unet_to_ldm(unet: Any) -> Tensors:
    """A diffusers UNet's weights under the LDM/SGM names (``input_blocks``...), unprefixed."""
    slots = unet.config.layers_per_block + 1
    state = unet.state_dict()
    attention_up = {
        key.split(".")[1] for key in state if re.match(r"up_blocks\.\d+\.attentions", key)
    }

    def rename(key: str) -> str:
        for old, new in _UNET_FIXED.items():
            if key.startswith(old):
                return new + key[len(old) :]
        match = _BLOCK.match(key)
        assert match, key
        kind, block, part, index, rest = match.groups()
        b, i = int(block or 0), int(index)
        if kind == "mid_block":  # resnet, attention, resnet
            resnet = part == "resnets"
            return f"middle_block.{2 * i}.{_resnet(rest)}" if resnet else f"middle_block.1.{rest}"
        if part == "downsamplers":
            return f"input_blocks.{(b + 1) * slots}.0.op.{rest.removeprefix('conv.')}"
        if part == "upsamplers":
            slot = 2 if block in attention_up else 1
            return f"output_blocks.{b * slots + slots - 1}.{slot}.{rest}"
        n = 1 + b * slots + i if kind == "down_blocks" else b * slots + i
        name = "input_blocks" if kind == "down_blocks" else "output_blocks"
        return f"{name}.{n}.0.{_resnet(rest)}" if part == "resnets" else f"{name}.{n}.1.{rest}"

    return _renamed(state, rename)


# --- VAE -------------------------------------------------------------------------------------

_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def vae_to_ldm(vae: Any) -> Tensors:
    """A diffusers ``AutoencoderKL``'s weights under the LDM names, unprefixed."""
    top = len(vae.config.up_block_types) - 1
    result: Tensors = {}
    for key, tensor in vae.state_dict().items():
        side, _, rest = key.partition(".")
        value = tensor
        if match := re.match(
            r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest
        ):
            direction, block, part, index, tail = match.groups()
            i = int(block) if direction == "down" else top - int(block)
            if part == "resnets":
                rest = (
                    f"{direction}.{i}.block.{index}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
                )
            else:
                rest = f"{direction}.{i}.{direction}sample.{tail}"
        elif match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
            rest = f"mid.block_{int(match[1]) + 1}.{match[2]}"
        elif match := re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)$", rest):
            rest = f"mid.attn_1.{_VAE_ATTENTION[match[1]]}.{match[2]}"
            if tensor.dim() == 2:  # the original's attention projections are 1x1 convolutions
                value = tensor[:, :, None, None]
        rest = rest.replace("conv_norm_out", "norm_out")
        result[f"{side}.{rest}"] = value
    return result


# --- text encoders ---------------------------------------------------------------------------


def clip_to_hf(encoder: Any) -> Tensors:
    """A CLIP text encoder's weights as ``CLIPTextModel`` saved them when these files were made:
    under ``text_model.`` (transformers 5 keeps ``CLIPTextModel``'s without it)."""
    kept = ("text_model.", "text_projection")
    return _renamed(encoder.state_dict(), lambda k: k if k.startswith(kept) else f"text_model.{k}")


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}  # fmt: skip
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
}  # fmt: skip


def clip_to_openclip(encoder: Any) -> Tensors:
    """A CLIP text encoder's weights in OpenCLIP's layout (SD 2.x's ViT-H, SDXL's bigG)."""
    state = {key.removeprefix("text_model."): value for key, value in encoder.state_dict().items()}
    result: Tensors = {}
    for key, tensor in state.items():
        if key in _OPENCLIP_TOP:
            result[_OPENCLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            result["text_projection"] = tensor.T.contiguous()
        elif match := re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", key):
            layer, module, kind = match.groups()
            block = f"transformer.resblocks.{layer}"
            if module == "self_attn.q_proj":  # OpenCLIP's attention projects q, k, v at once
                parts = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                result[f"{block}.attn.in_proj_{kind}"] = torch.cat(parts)
            elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
                result[f"{block}.{_OPENCLIP_LAYER[module]}.{kind}"] = tensor
        else:
            raise AssertionError(key)
    return result


def t5_weights(encoder: Any) -> Tensors:
    # The embedding is tied (``shared`` is ``encoder.embed_tokens``); files store both names.
    return {key: tensor.clone() for key, tensor in encoder.state_dict().items()}


_TEXT_LAYOUTS: dict[str, Callable[[Any], Tensors]] = {
    _HF: clip_to_hf, _OPENCLIP: clip_to_openclip, _T5: t5_weights,
}  # fmt: skip


# --- MMDiT -----------------------------------------------------------------------------------


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def _stacked(state: Mapping[str, torch.Tensor], new: str, olds: list[str]) -> Tensors:
    """The modules ``olds`` stacked along their outputs into ``new`` (q, k, v -> qkv)."""
    return {
        f"{new}.{kind}": torch.cat([state[f"{old}.{kind}"] for old in olds])
        for kind in ("weight", "bias")
        if all(f"{old}.{kind}" in state for old in olds)
    }


def _same(state: Mapping[str, torch.Tensor], pairs: Mapping[str, str]) -> Tensors:
    """Modules renamed as a whole: every ``old.<param>`` becomes ``new.<param>``."""
    return {
        new + key[len(old) :]: tensor
        for old, new in pairs.items()
        for key, tensor in state.items()
        if key.startswith(old + ".")
    }


def _final_layer(state: Mapping[str, torch.Tensor]) -> Tensors:
    # diffusers' AdaLayerNormContinuous splits scale, shift; SAI's and BFL's code shift, scale.
    return {
        f"final_layer.adaLN_modulation.1.{kind}": _swap_halves(state[f"norm_out.linear.{kind}"])
        for kind in ("weight", "bias")
    }


def sd3_to_mmdit(transformer: Any) -> Tensors:
    """An ``SD3Transformer2DModel``'s weights under SAI's MMDiT names, unprefixed."""
    s, last = transformer.state_dict(), transformer.config.num_layers - 1
    t = "time_text_embed."
    r = {"pos_embed": s["pos_embed.pos_embed"], **_final_layer(s)}
    r |= _same(s, {
        "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
        "proj_out": "final_layer.linear", f"{t}timestep_embedder.linear_1": "t_embedder.mlp.0",
        f"{t}timestep_embedder.linear_2": "t_embedder.mlp.2",
        f"{t}text_embedder.linear_1": "y_embedder.mlp.0",
        f"{t}text_embedder.linear_2": "y_embedder.mlp.2",
    })  # fmt: skip
    for i in range(last + 1):
        d, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        x, c = f"{j}x_block.", f"{j}context_block."
        r |= _stacked(s, f"{x}attn.qkv", [f"{d}attn.to_{p}" for p in "qkv"])
        r |= _stacked(s, f"{c}attn.qkv", [f"{d}attn.add_{p}_proj" for p in "qkv"])
        r |= _stacked(s, f"{x}attn2.qkv", [f"{d}attn2.to_{p}" for p in "qkv"])
        pairs = {
            "attn.norm_q": f"{x}attn.ln_q", "attn.norm_k": f"{x}attn.ln_k",
            "attn.norm_added_q": f"{c}attn.ln_q", "attn.norm_added_k": f"{c}attn.ln_k",
            "attn.to_out.0": f"{x}attn.proj", "attn.to_add_out": f"{c}attn.proj",
            "attn2.norm_q": f"{x}attn2.ln_q", "attn2.norm_k": f"{x}attn2.ln_k",
            "attn2.to_out.0": f"{x}attn2.proj", "norm1.linear": f"{x}adaLN_modulation.1",
            "ff.net.0.proj": f"{x}mlp.fc1", "ff.net.2": f"{x}mlp.fc2",
            "ff_context.net.0.proj": f"{c}mlp.fc1", "ff_context.net.2": f"{c}mlp.fc2",
        }  # fmt: skip
        r |= _same(s, {d + old: new for old, new in pairs.items()})
        # The last context block only modulates (shift, scale: swapped like the final layer).
        context = _same(s, {d + "norm1_context.linear": f"{c}adaLN_modulation.1"})
        r |= {k: _swap_halves(v) for k, v in context.items()} if i == last else context
    return r


def flux_to_bfl(transformer: Any) -> Tensors:
    """A ``FluxTransformer2DModel``'s weights under Black Forest Labs' names, unprefixed."""
    s, t = transformer.state_dict(), "time_text_embed."
    r = _final_layer(s) | _same(s, {
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
        **{f"{t}{old}_embedder.linear_{n + 1}": f"{new}_in.{layer}"
           for old, new in (("timestep", "time"), ("text", "vector"), ("guidance", "guidance"))
           for n, layer in enumerate(("in_layer", "out_layer"))},
    })  # fmt: skip
    for i in range(transformer.config.num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        r |= _stacked(s, f"{b}img_attn.qkv", [f"{d}attn.to_{p}" for p in "qkv"])
        r |= _stacked(s, f"{b}txt_attn.qkv", [f"{d}attn.add_{p}_proj" for p in "qkv"])
        pairs = {
            "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
            "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
            "attn.norm_added_q": "txt_attn.norm.query_norm",
            "attn.norm_added_k": "txt_attn.norm.key_norm",
            "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
        }  # fmt: skip
        r |= _same(s, {d + old: b + new for old, new in pairs.items()})
    for i in range(transformer.config.num_single_layers):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        parts = [f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v", f"{d}proj_mlp"]
        r |= _stacked(s, f"{b}linear1", parts)
        pairs = {
            "norm.linear": "modulation.lin", "proj_out": "linear2",
            "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
        }  # fmt: skip
        r |= _same(s, {d + old: b + new for old, new in pairs.items()})
    # RMSNorm weights are called "scale" in BFL's code.
    return {re.sub(r"(query_norm|key_norm)\.weight$", r"\1.scale", k): v for k, v in r.items()}


# --- whole checkpoints -----------------------------------------------------------------------


def original_state_dict(
    pipeline: Any,
    layout: Layout,
    *,
    without: Collection[str] = (),
    denoiser_prefix: str = UNET,
) -> Tensors:
    """``pipeline``'s weights in the single-file layout of ``layout``, leaving out the
    components named in ``without`` (``unet``/``transformer``, ``vae``, ``text_encoder``...)."""
    result: Tensors = {}
    denoiser: Tensors = {}
    if layout in ("sd1", "sd2", "sdxl") and "unet" not in without:
        denoiser = unet_to_ldm(pipeline.unet)
    elif layout in ("sd3", "flux") and "transformer" not in without:
        denoiser = (sd3_to_mmdit if layout == "sd3" else flux_to_bfl)(pipeline.transformer)
    result |= {denoiser_prefix + key: tensor for key, tensor in denoiser.items()}
    if "vae" not in without:
        vae_prefix = "vae." if layout == "flux" else "first_stage_model."
        result |= {vae_prefix + key: tensor for key, tensor in vae_to_ldm(pipeline.vae).items()}
    for component, (prefix, kind) in TEXT_PREFIXES[layout].items():
        if component not in without:
            weights = _TEXT_LAYOUTS[kind](getattr(pipeline, component))
            result |= {prefix + key: tensor for key, tensor in weights.items()}
    return result


def save_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    converted = {key: tensor.detach().to(dtype).contiguous() for key, tensor in tensors.items()}
    save_file(converted, str(path), metadata={"format": "pt"})
    return path


def write_checkpoint(
    family: Family,
    path: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    without: Collection[str] = (),
    denoiser_prefix: str = UNET,
) -> Path:
    """The tiny ``family`` model (``build_family_pipeline(family, seed)``) as one original-layout
    ``.safetensors`` file in ``dtype``; ``without`` leaves components out."""
    pipeline = build_family_pipeline(family, seed)
    tensors = original_state_dict(
        pipeline, LAYOUTS[family], without=without, denoiser_prefix=denoiser_prefix
    )
    return save_checkpoint(path, tensors, dtype)


def header_of(shapes: Mapping[str, torch.Tensor], dtype: str = "F16") -> SafetensorsHeader:
    """The header a file of these tensors (real or ``meta``) would have, in ``dtype``."""
    size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    tensors: dict[str, TensorInfo] = {}
    offset = 0
    for key, tensor in shapes.items():
        end = offset + tensor.numel() * size
        tensors[key] = TensorInfo(dtype, tuple(tensor.shape), (offset, end))
        offset = end
    return SafetensorsHeader(tensors=tensors, metadata={}, header_length=0, file_size=offset)


def write_header_only(path: Path, shapes: Mapping[str, torch.Tensor], dtype: str = "F16") -> Path:
    """A file with a real header and a sparse (unwritten, all-zero) data section of the full
    length: a real model's layout without gigabytes on disk."""
    header = header_of(shapes, dtype)
    entries = {
        key: {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": list(info.data_offsets),
        }
        for key, info in header.tensors.items()
    }
    raw = json.dumps(entries, separators=(",", ":")).encode()
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(raw)) + raw)
        file.truncate(8 + len(raw) + header.file_size)
    return path


# --- what users bring by mistake ---------------------------------------------------------------


def write_vae_only(
    path: Path, family: Family = "sd1", *, layout: str = "ldm", prefix: str = ""
) -> Path:
    """The tiny ``family`` VAE alone: ``layout="ldm"`` as ``vae-ft-mse-840000`` files are
    (``encoder.down.0.block.0...``), ``"diffusers"`` as ``vae/diffusion_pytorch_model``."""
    vae = build_family_pipeline(family).vae
    weights = vae_to_ldm(vae) if layout == "ldm" else vae.state_dict()
    return save_checkpoint(path, {prefix + k: v for k, v in weights.items()}, torch.float16)


def write_text_encoder_only(
    path: Path, family: Family = "sd1", component: str = "text_encoder", *, prefix: str = ""
) -> Path:
    """One tiny text encoder alone, as ``clip_l.safetensors``/``t5xxl_fp16.safetensors`` are
    (transformers' own names), or under ``prefix`` (``cond_stage_model.transformer.``...)."""
    encoder = getattr(build_family_pipeline(family), component)
    weights = t5_weights(encoder) if "T5" in type(encoder).__name__ else clip_to_hf(encoder)
    return save_checkpoint(path, {prefix + k: v for k, v in weights.items()}, torch.float16)


def all_but_the_denoiser(family: Family) -> set[str]:
    """``without`` for a file of the denoiser alone (as BFL publish ``flux1-dev.safetensors``)."""
    return {"vae", *TEXT_PREFIXES[LAYOUTS[family]]}


def write_lora_checkpoint(
    path: Path, family: Literal["sd1", "sd2", "sdxl", "sd3", "flux"] = "sd1", fmt: Any = "kohya"
) -> Path:
    """A tiny LoRA of ``family`` in format ``fmt`` (``family_loras``), offered as a model."""
    return write_family_lora(path, family, fmt=fmt, size="tiny")
