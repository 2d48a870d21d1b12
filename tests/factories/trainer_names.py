"""The module names LoRA trainers write for the tiny family models, and where each one lands.

A trainer adapts modules of *its own* copy of the model and names them its own way; a
:class:`NamedLayer` is one such module: the name the trainer writes (without the tensor
suffix), the weight shape the trainer's module has, and the diffusers module(s) of the
pipeline its weight difference lands on (:class:`Landing`; fused layers give each module a
range of rows). Every function here reads the real pipeline, so the names, shapes and
landings are those of the tiny model (``tests.factories.family_models``).

Sources (public code, read to learn; nothing is copied):

* kohya-ss/sd-scripts ``networks/lora.py``: ``lora_unet_`` / ``lora_te_`` (SDXL: ``lora_te1_``,
  ``lora_te2_``) + the module path with ``.`` replaced by ``_``. The U-Net's Linear and 1x1
  Conv2d layers inside ``Transformer2DModel``; with ``conv_dim`` (LoCon) also every layer inside
  ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D``; text encoders: the layers inside
  ``CLIPAttention`` / ``CLIPMLP``. For SDXL, sd-scripts trains its own U-Net in the original SGM
  layout (``library/sdxl_original_unet.py``; ``library/sdxl_model_util.py`` converts it to
  diffusers for the real SDXL): ``input_blocks.{i}.{j}``, ``middle_block.{i}``,
  ``output_blocks.{i}.{j}``; resnets ``in_layers.2`` / ``emb_layers.1`` / ``out_layers.3`` /
  ``skip_connection``; downsamplers ``op``; upsamplers ``conv`` (:func:`sgm_blocks`).
* ``networks/lora_sd3.py`` with ``library/sd3_models.py``: SAI MMDiT names
  ``joint_blocks.{i}.{context_block,x_block}.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2,
  adaLN_modulation.1}``; ``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G, ``lora_te3_`` T5 (layers
  inside ``T5Attention`` / ``T5DenseGatedActDense``). The last block's context stream is
  "pre only": qkv and a modulation of two chunks, shift then scale, where diffusers'
  ``norm1_context`` has scale then shift (``diffusers/loaders/single_file_utils.py`` swaps them).
* ``networks/lora_flux.py``: BFL names ``double_blocks.{i}.{img,txt}_{attn.qkv,attn.proj,mlp.0,
  mlp.2,mod.lin}``, ``single_blocks.{i}.{linear1,linear2,modulation.lin}``; ``lora_te1_`` CLIP,
  ``lora_te3_`` T5. Where they land: diffusers ``loaders/lora_conversion_utils.py``
  (``_convert_kohya_flux_lora_to_diffusers``): ``qkv`` rows to ``to_q``/``to_k``/``to_v``
  (text stream ``add_{q,k,v}_proj``), ``linear1`` rows to ``to_q``, ``to_k``, ``to_v``,
  ``proj_mlp``.
* KohakuBlueleaf/LyCORIS ``lycoris/kohya.py``: the same prefixes; every layer inside
  ``Transformer2DModel`` / ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D``, plus
  ``conv_in``, ``conv_out``, ``time_embedding.linear_{1,2}`` by name (names the SGM U-Net does
  not have), and with ``train_norm`` the norm layers inside the target modules.
* XLabs-AI/x-flux ``src/flux/modules/layers.py``: ``double_blocks.{i}.processor.
  {qkv,proj}_lora{1,2}`` (1: image stream, 2: text stream) and ``single_blocks.{i}.processor.
  {qkv,proj}_lora``, whose ``proj_lora`` adds to ``linear2`` (input: attention and MLP
  outputs, 5 x width); where they land: diffusers' ``_convert_xlabs_flux_lora_to_diffusers``.
* diffusers/PEFT: the diffusers module names behind ``unet.`` / ``transformer.`` /
  ``text_encoder*.``; CLIP names keep ``text_model.``, which transformers 5 dropped from
  ``CLIPTextModel`` (not from ``CLIPTextModelWithProjection``): the expected module names are
  the real ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch

from tests.factories.family_models import Family

_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)
_NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)

KOHYA_UNET_CONTAINERS = ("Transformer2DModel",)
KOHYA_CONV_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
LYCORIS_UNET_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
CLIP_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
T5_CONTAINERS = ("T5Attention", "T5DenseGatedActDense")
PEFT_UNET_TARGETS = (
    *("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    *("proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"),
)
"""What the PEFT files adapt in a U-Net: attention, feed-forward, projections and resnets."""
PEFT_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class Landing:
    """Rows of a file layer's weight difference that land on one module of the pipeline."""

    component: str
    module: str
    """The module inside the component, as ``named_modules()`` gives it."""
    rows: slice | None = None
    """The rows of the file layer's difference (``None``: all of them)."""
    to_rows: slice | None = None
    """The rows of the module they go to (``None``: all of them)."""


@dataclass(frozen=True)
class NamedLayer:
    """One module as a trainer names it."""

    name: str
    """The name as written, before the tensor suffix (``lora_unet_..._to_q``, ``transformer.
    transformer_blocks.0.attn.to_q``, ``double_blocks.0.processor.qkv_lora1``)."""
    shape: tuple[int, ...]
    """The trainer's module weight: ``(out, in)``, ``(out, in, kh, kw)``, or ``(features,)`` for
    a norm layer. Fused layers have the rows of all their landings."""
    landings: tuple[Landing, ...]
    bias: bool
    """Every module it lands on has a bias (what LyCORIS ``full`` / norm layers also change)."""

    @property
    def is_norm(self) -> bool:
        return len(self.shape) == 1

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.shape[2:]

    @property
    def component(self) -> str:
        return self.landings[0].component


def weight(pipeline: Any, component: str, name: str, kind: str = "weight") -> torch.Tensor | None:
    """The ``weight`` (or ``bias``) of module ``name`` of ``component``, detached."""
    found = getattr(getattr(pipeline, component).get_submodule(name), kind, None)
    return found.detach() if isinstance(found, torch.Tensor) else None


def fused_layer(pipeline: Any, name: str, component: str, modules: Sequence[str]) -> NamedLayer:
    """A layer whose rows land on ``modules`` of ``component``, in that order."""
    landings: list[Landing] = []
    shapes = [tuple(weight(pipeline, component, m).shape) for m in modules]  # type: ignore[union-attr]
    start = 0
    for target, shape in zip(modules, shapes, strict=True):
        rows = slice(start, start + shape[0]) if len(modules) > 1 else None
        landings.append(Landing(component, target, rows))
        start += shape[0]
    bias = all(weight(pipeline, component, m, "bias") is not None for m in modules)
    return NamedLayer(name, (start, *shapes[0][1:]), tuple(landings), bias)


def swapped_layer(pipeline: Any, name: str, component: str, target: str) -> NamedLayer:
    """A two-chunk modulation written shift, scale, landing on a module that has scale, shift."""
    layer = fused_layer(pipeline, name, component, [target])
    half = layer.shape[0] // 2
    first, second = slice(0, half), slice(half, 2 * half)
    landings = (
        Landing(component, target, first, second),
        Landing(component, target, second, first),
    )
    return NamedLayer(name, layer.shape, landings, layer.bias)


def _inside(model: torch.nn.Module, containers: Iterable[str]) -> Callable[[str], bool]:
    """Whether a module name of ``model`` lies inside a module of one of ``containers``' classes."""
    wanted = set(containers)
    parents = {name for name, found in model.named_modules() if type(found).__name__ in wanted}

    def inside(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:end]) in parents for end in range(len(parts)))

    return inside


def _layers(
    pipeline: Any,
    component: str,
    chosen: Callable[[str, torch.nn.Module], bool],
    written: Callable[[str], str],
) -> list[NamedLayer]:
    """One layer per ``chosen`` module of ``component`` (with a weight), named ``written(name)``."""
    return [
        fused_layer(pipeline, written(name), component, [name])
        for name, found in getattr(pipeline, component).named_modules()
        if getattr(found, "weight", None) is not None and chosen(name, found)
    ]


def unet_layers(
    pipeline: Any,
    *,
    containers: Sequence[str],
    names: Sequence[str] = (),
    norms: bool = False,
    sgm: bool = False,
) -> list[NamedLayer]:
    """Kohya/LyCORIS U-Net layers: those inside ``containers`` or named in ``names``."""
    inside = _inside(pipeline.unet, containers)
    rename = sgm_namer(pipeline.unet.config) if sgm else str
    kinds = _LAYER_TYPES + (_NORM_TYPES if norms else ())
    return _layers(
        pipeline,
        "unet",
        lambda name, found: isinstance(found, kinds) and (name in names or inside(name)),
        lambda name: "lora_unet_" + rename(name).replace(".", "_"),
    )


def text_layers(pipeline: Any, component: str, prefix: str) -> list[NamedLayer]:
    """Kohya/LyCORIS text-encoder layers (CLIP or T5) of ``component``, written ``prefix_...``."""
    encoder = getattr(pipeline, component)
    is_t5 = type(encoder).__name__.startswith("T5")
    inside = _inside(encoder, T5_CONTAINERS if is_t5 else CLIP_CONTAINERS)
    return _layers(
        pipeline,
        component,
        lambda name, found: isinstance(found, torch.nn.Linear) and inside(name),
        lambda name: f"{prefix}_" + (name if is_t5 else _text_model(name)).replace(".", "_"),
    )


def _text_model(name: str) -> str:
    return "text_model." + name.removeprefix("text_model.")


def peft_layers(pipeline: Any, components: Sequence[str]) -> list[NamedLayer]:
    """diffusers/PEFT layers: ``unet.<module>``, ``transformer.<module>`` (every Linear of the
    transformer blocks, as ai-toolkit adapts them), ``text_encoder*.text_model.<module>``."""
    layers = []
    for component in components:
        for name, found in getattr(pipeline, component).named_modules():
            if component == "transformer":
                chosen = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            else:
                targets = PEFT_UNET_TARGETS if component == "unet" else PEFT_TEXT_TARGETS
                chosen = name.endswith(tuple(f".{target}" for target in targets))
            if chosen and isinstance(found, _LAYER_TYPES):
                written = _text_model(name) if component.startswith("text") else name
                layers.append(fused_layer(pipeline, f"{component}.{written}", component, [name]))
    return layers


# --- SGM (original SDXL) block names ---------------------------------------------------------

_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
}


def sgm_blocks(config: Any) -> dict[str, str]:
    """diffusers U-Net block -> SGM block, laid out as SGM lays out a U-Net of this config.

    ``input_blocks.0`` is ``conv_in``; then per down block ``layers_per_block`` entries (resnet
    ``.0``, attention ``.1``) and one downsampler entry (``.0.op``) except after the last;
    ``middle_block`` 0/1/2 is resnet, attention, resnet; per up block ``layers_per_block + 1``
    entries (resnet ``.0``, attention ``.1``), the last also holding the upsampler (``.2`` after
    an attention, else ``.1``) except in the last up block.
    """
    per_block = int(config.layers_per_block)
    table = dict(_SGM_TOP)
    index = 1
    downs = config.down_block_types
    for i, kind in enumerate(downs):
        for j in range(per_block):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if kind.startswith("CrossAttn"):
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < len(downs) - 1:
            table[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{index}.0"
            index += 1
    index = 0
    ups = config.up_block_types
    for i, kind in enumerate(ups):
        attention = kind.startswith("CrossAttn")
        for j in range(per_block + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attention:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if i < len(ups) - 1:
            table[f"up_blocks.{i}.upsamplers.0"] = (
                f"output_blocks.{index - 1}.{2 if attention else 1}"
            )
    return table


def sgm_namer(config: Any) -> Callable[[str], str]:
    """A function from a diffusers U-Net module name to its SGM name (see :func:`sgm_blocks`)."""
    table = sgm_blocks(config)

    def rename(name: str) -> str:
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            block = ".".join(parts[:end])
            if block in table:
                inner = ".".join(parts[end:])
                if ".resnets." in f".{block}.":
                    inner = _SGM_RESNET.get(inner, inner)
                elif ".downsamplers." in block and inner == "conv":
                    inner = "op"
                return f"{table[block]}.{inner}" if inner else table[block]
        raise ValueError(f"no SGM name for U-Net module {name}")

    return rename


def kohya_block_index(name: str, *, sdxl: bool) -> int:
    """sd-scripts' block of a ``lora_unet_`` layer for ``block_dims`` (``networks/lora.py``,
    ``get_block_index``). SD 1.x/2.x: ``down_blocks_i`` 1 + 3i + j (resnet or attention j,
    downsampler j = 2), ``mid_block`` 12, ``up_blocks_i`` 13 + 3i + j (upsampler j = 2); SDXL:
    ``input_blocks_N`` 1 + N, ``middle_block_N`` 10 + N, ``output_blocks_N`` 13 + N."""
    rest = name.removeprefix("lora_unet_")
    if sdxl:
        match = re.match(r"(input_blocks|middle_block|output_blocks)_(\d+)_", rest)
        assert match is not None, name
        return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[match[1]] + int(
            match[2]
        )
    if rest.startswith("mid_block_"):
        return 12
    match = re.match(
        r"(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_", rest
    )
    assert match is not None, name
    inner = int(match[4]) if match[3] in ("resnets", "attentions") else 2
    return (1 if match[1] == "down" else 13) + 3 * int(match[2]) + inner


# --- SD3 (SAI MMDiT) and FLUX.1 (BFL) names ----------------------------------------------------


def sd3_layers(pipeline: Any) -> list[NamedLayer]:
    """The SAI MMDiT layers sd-scripts adapts (every Linear of each ``SingleDiTBlock``), named
    by their dotted SAI paths."""
    layers = []
    for i, block in enumerate(pipeline.transformer.transformer_blocks):
        b, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        table: list[tuple[str, tuple[str, ...]]] = [
            (f"{j}.context_block.attn.qkv", tuple(f"{b}.attn.add_{x}_proj" for x in "qkv")),
            (f"{j}.x_block.attn.qkv", tuple(f"{b}.attn.to_{x}" for x in "qkv")),
            (f"{j}.x_block.attn.proj", (f"{b}.attn.to_out.0",)),
            (f"{j}.x_block.mlp.fc1", (f"{b}.ff.net.0.proj",)),
            (f"{j}.x_block.mlp.fc2", (f"{b}.ff.net.2",)),
            (f"{j}.x_block.adaLN_modulation.1", (f"{b}.norm1.linear",)),
        ]
        if not block.context_pre_only:
            table += [
                (f"{j}.context_block.attn.proj", (f"{b}.attn.to_add_out",)),
                (f"{j}.context_block.mlp.fc1", (f"{b}.ff_context.net.0.proj",)),
                (f"{j}.context_block.mlp.fc2", (f"{b}.ff_context.net.2",)),
                (f"{j}.context_block.adaLN_modulation.1", (f"{b}.norm1_context.linear",)),
            ]
        layers += [fused_layer(pipeline, name, "transformer", list(to)) for name, to in table]
        if block.context_pre_only:
            name = f"{j}.context_block.adaLN_modulation.1"
            layers.append(swapped_layer(pipeline, name, "transformer", f"{b}.norm1_context.linear"))
    return layers


def flux_layers(pipeline: Any) -> list[NamedLayer]:
    """The BFL FLUX.1 layers sd-scripts adapts (every Linear of the double and single blocks),
    named by their dotted BFL paths."""
    transformer = pipeline.transformer
    table: list[tuple[str, tuple[str, ...]]] = []
    for i in range(len(transformer.transformer_blocks)):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        table += [
            (f"{d}.img_attn.qkv", tuple(f"{b}.attn.to_{x}" for x in "qkv")),
            (f"{d}.img_attn.proj", (f"{b}.attn.to_out.0",)),
            (f"{d}.img_mlp.0", (f"{b}.ff.net.0.proj",)),
            (f"{d}.img_mlp.2", (f"{b}.ff.net.2",)),
            (f"{d}.img_mod.lin", (f"{b}.norm1.linear",)),
            (f"{d}.txt_attn.qkv", tuple(f"{b}.attn.add_{x}_proj" for x in "qkv")),
            (f"{d}.txt_attn.proj", (f"{b}.attn.to_add_out",)),
            (f"{d}.txt_mlp.0", (f"{b}.ff_context.net.0.proj",)),
            (f"{d}.txt_mlp.2", (f"{b}.ff_context.net.2",)),
            (f"{d}.txt_mod.lin", (f"{b}.norm1_context.linear",)),
        ]
    for i in range(len(transformer.single_transformer_blocks)):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        qkv_mlp = (*(f"{b}.attn.to_{x}" for x in "qkv"), f"{b}.proj_mlp")
        table += [
            (f"{s}.linear1", qkv_mlp),
            (f"{s}.linear2", (f"{b}.proj_out",)),
            (f"{s}.modulation.lin", (f"{b}.norm.linear",)),
        ]
    return [fused_layer(pipeline, name, "transformer", list(to)) for name, to in table]


def xlabs_layers(pipeline: Any) -> list[NamedLayer]:
    """The x-flux LoRA processors of every double and single block."""
    transformer = pipeline.transformer
    table: list[tuple[str, tuple[str, ...]]] = []
    for i in range(len(transformer.transformer_blocks)):
        p, b = f"double_blocks.{i}.processor", f"transformer_blocks.{i}.attn"
        table += [
            (f"{p}.qkv_lora1", tuple(f"{b}.to_{x}" for x in "qkv")),
            (f"{p}.proj_lora1", (f"{b}.to_out.0",)),
            (f"{p}.qkv_lora2", tuple(f"{b}.add_{x}_proj" for x in "qkv")),
            (f"{p}.proj_lora2", (f"{b}.to_add_out",)),
        ]
    for i in range(len(transformer.single_transformer_blocks)):
        p, b = f"single_blocks.{i}.processor", f"single_transformer_blocks.{i}"
        table += [
            (f"{p}.qkv_lora", tuple(f"{b}.attn.to_{x}" for x in "qkv")),
            (f"{p}.proj_lora", (f"{b}.proj_out",)),
        ]
    return [fused_layer(pipeline, name, "transformer", list(to)) for name, to in table]


# --- what each format writes: which layers, at which rank and alpha -----------------------------

TrainerFormat = Literal[
    "kohya",
    "kohya-locon",
    "lycoris-locon",
    "lycoris-loha",
    "lycoris-lokr",
    "lycoris-full",
    "lycoris-dora",
    "lycoris-dora-input",
    "lycoris-norm",
    "peft",
    "peft-dora",
    "bfl",
    "xlabs",
]
_UNET_FORMATS: tuple[TrainerFormat, ...] = get_args(TrainerFormat)[:11]
_FLUX_FORMATS: tuple[TrainerFormat, ...] = ("kohya", "peft", "peft-dora", "bfl", "xlabs")
FORMATS: dict[Family, tuple[TrainerFormat, ...]] = {
    "sd1": _UNET_FORMATS,
    "sd2": _UNET_FORMATS,
    "sdxl": _UNET_FORMATS,
    "sd3": ("kohya", "peft", "peft-dora"),
    "flux-dev": _FLUX_FORMATS,
    "flux-schnell": _FLUX_FORMATS,
}
"""The formats written for each family."""


@dataclass(frozen=True)
class TrainerCase:
    family: Family
    trainer_format: TrainerFormat
    alpha: float | None = None

    @property
    def id(self) -> str:
        alpha = "" if self.alpha is None else f"-alpha{self.alpha:g}"
        return f"{self.family}-{self.trainer_format}{alpha}"


TRAINER_CASES: tuple[TrainerCase, ...] = (
    *(TrainerCase(family, fmt) for family, formats in FORMATS.items() for fmt in formats),
    TrainerCase("sdxl", "peft", alpha=8.0),  # alpha in lora_adapter_metadata
    TrainerCase("flux-dev", "peft-dora", alpha=2.0),
)
"""Every family x format, and PEFT files whose alpha is not the rank."""

_TEXT_PREFIXES: dict[Family, tuple[tuple[str, str], ...]] = {
    "sd1": (("text_encoder", "lora_te"),),
    "sd2": (("text_encoder", "lora_te"),),
    "sdxl": (("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")),
    "sd3": tuple((f"text_encoder{s}", f"lora_te{i}") for i, s in ((1, ""), (2, "_2"), (3, "_3"))),
    "flux-dev": (("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te3")),
    "flux-schnell": (("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te3")),
}
_PEFT_COMPONENTS: dict[Family, tuple[str, ...]] = {
    "sd1": ("unet", "text_encoder"),
    "sd2": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
    "sd3": ("transformer", "text_encoder", "text_encoder_2"),
    "flux-dev": ("transformer", "text_encoder"),
    "flux-schnell": ("transformer", "text_encoder"),
}
Algorithm = Literal["lora", "loha", "lokr", "full"]


@dataclass(frozen=True)
class LayerPlan:
    """What a file holds: its layers, each one's network type, rank and alpha."""

    layers: list[NamedLayer]
    style: Literal["kohya", "peft", "bfl", "xlabs"]
    """The key style: Kohya/LyCORIS suffixes, PEFT ``lora_A``/``lora_B``, BFL, x-flux."""
    algorithm: Algorithm
    dims: Callable[[NamedLayer], tuple[int, float | None]]
    """(rank, alpha) of a layer; alpha ``None``: scale 1 and none written."""
    tucker: bool = False
    """LyCORIS ``use_tucker``: kxk convs get a Tucker core."""
    dora: Literal["output", "input", "peft"] | None = None
    network_args: dict[str, str] | None = None


def layer_plan(
    pipeline: Any, family: Family, fmt: TrainerFormat, rank: int, alpha: float
) -> LayerPlan:
    """Which layers a ``fmt`` file of the tiny ``family`` model holds, and their dims: sd-scripts'
    ``block_dims``/``block_alphas`` (Kohya on U-Nets), ``conv_dim`` (half the rank; Kohya
    ``conv_alpha`` 1, LyCORIS ``conv_alpha`` = alpha), the network dim and alpha elsewhere."""
    sdxl = family == "sdxl"
    text = [x for c, prefix in _TEXT_PREFIXES[family] for x in text_layers(pipeline, c, prefix)]
    conv_dim = max(1, rank // 2)
    if fmt == "kohya" and family in ("sd3", "flux-dev", "flux-schnell"):
        mmdit = sd3_layers(pipeline) if family == "sd3" else flux_layers(pipeline)
        layers = [replace(x, name="lora_unet_" + x.name.replace(".", "_")) for x in mmdit]
        args = {"train_t5xxl": "True"}
        return LayerPlan(layers + text, "kohya", "lora", lambda _: (rank, alpha), network_args=args)
    if fmt.startswith("kohya"):
        containers: tuple[str, ...] = KOHYA_UNET_CONTAINERS
        args = {}
        if fmt == "kohya-locon":
            containers += KOHYA_CONV_CONTAINERS
            args = {"conv_dim": str(conv_dim), "conv_alpha": "1.0"}
        blocks = 23 if sdxl else 25
        block_dims = [(rank, conv_dim, 2 * rank)[i % 3] for i in range(blocks)]
        block_alphas = [alpha * (1.0, 2.0, 0.5, 1.5)[i % 4] for i in range(blocks)]
        args["block_dims"] = ",".join(map(str, block_dims))
        args["block_alphas"] = ",".join(map(str, block_alphas))

        def kohya_dims(layer: NamedLayer) -> tuple[int, float | None]:
            if layer.component != "unet":
                return rank, alpha
            if layer.kernel not in ((), (1, 1)):
                return conv_dim, 1.0
            block = kohya_block_index(layer.name, sdxl=sdxl)
            return block_dims[block], block_alphas[block]

        layers = unet_layers(pipeline, containers=containers, sgm=sdxl)
        return LayerPlan(layers + text, "kohya", "lora", kohya_dims, network_args=args)
    if fmt.startswith("lycoris"):
        algo = fmt.removeprefix("lycoris-")
        extra = () if sdxl else LYCORIS_UNET_NAMES
        containers = KOHYA_UNET_CONTAINERS + KOHYA_CONV_CONTAINERS
        unet = unet_layers(
            pipeline, containers=containers, names=extra, norms=algo == "norm", sgm=sdxl
        )
        algorithm: Algorithm = algo if algo in ("loha", "lokr", "full") else "lora"  # type: ignore[assignment]
        args = {"algo": "locon" if algorithm == "lora" else algorithm}
        args |= {"conv_dim": str(conv_dim), "conv_alpha": str(alpha)}
        tucker = algo in ("locon", "loha", "lokr")
        args |= {"use_tucker": "True"} if tucker else {}
        args |= {"dora_wd": "True", "wd_on_output": str(algo == "dora")} if "dora" in algo else {}
        args |= {"train_norm": "True"} if algo == "norm" else {}
        dora: Literal["output", "input"] | None = None
        if "dora" in algo:
            dora = "output" if algo == "dora" else "input"

        def lycoris_dims(layer: NamedLayer) -> tuple[int, float | None]:
            return (conv_dim, alpha) if layer.kernel not in ((), (1, 1)) else (rank, alpha)

        return LayerPlan(unet + text, "kohya", algorithm, lycoris_dims, tucker, dora, args)
    if fmt.startswith("peft"):
        layers = peft_layers(pipeline, _PEFT_COMPONENTS[family])
        peft_dora: Literal["peft"] | None = "peft" if fmt == "peft-dora" else None
        return LayerPlan(layers, "peft", "lora", lambda _: (rank, alpha), dora=peft_dora)
    if fmt == "bfl":
        layers = [replace(x, name=f"diffusion_model.{x.name}") for x in flux_layers(pipeline)]
        return LayerPlan(layers, "bfl", "lora", lambda _: (rank, None))
    return LayerPlan(xlabs_layers(pipeline), "xlabs", "lora", lambda _: (rank, None))
