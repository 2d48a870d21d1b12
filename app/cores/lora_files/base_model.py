"""Which model family a LoRA was made for, from its keys and tensor shapes.

The safetensors metadata often says (``ss_base_model_version``, ``modelspec.architecture``),
but it is missing from many files and wrong in some (copied from another training run,
merged files, hand-edited headers). The layers themselves cannot lie: a LoRA layer's input
width is the width of the layer it was trained on. So the family is decided from the header
(names, shapes; no tensor data), and the metadata's claim is kept beside it, used only to
choose between families the shapes leave open, and reported when it disagrees.

A layer's widths come from whichever tensors its format stores: down (rank x in) and up
(out x rank) matrices (Kohya, PEFT, diffusers' legacy ``to_k_lora``, XLabs' ``qkv_lora1``);
LyCORIS LoHa ``hada_w1_b`` (rank x in) and ``hada_w1_a`` (out x rank); LoKr, the Kronecker
product of ``lokr_w1`` (a x b) and ``lokr_w2`` (c x d), each whole or an ``_a``/``_b`` pair,
so (a*c) x (b*d); a full ``.diff`` (out x in). Rules (names as trainers write them and as
diffusers 0.42's ``lora_conversion_utils`` reads them; widths from ``model_family``):

* MMDiT models, by block names first. FLUX.1: ``double_blocks_N_{img,txt}_*`` /
  ``single_blocks_N_{linear1,linear2,modulation}`` (Kohya, BFL), ``{double,single}_blocks.N.
  processor.*`` (XLabs) or diffusers' ``single_transformer_blocks.N`` (not with AuraFlow's
  ``joint_transformer_blocks``), at most 19 double and 38 single blocks (HunyuanVideo has
  more). SD3: ``joint_blocks_N_{x_block,context_block}`` (SAI/Kohya) or diffusers'
  ``transformer_blocks.N.attn.add_q_proj`` without single-stream blocks. The hidden width
  (queries' input, output projections' output) tells real from tiny; T5 layers (Kohya
  ``lora_te3_encoder_block_N_...``) must agree.
* UNet models. A cross-attention key/value projection's input (``attn2.to_k``,
  ``attn2.processor.to_k_lora``) is the text width, which names the family; attention widths
  and resnet (LoCon) widths must agree; attention blocks deeper than one transformer block
  exist only in SDXL. Where only tiny models remain, the embedded one among them, it is
  chosen (they share their UNet widths).
* Text encoders: a second CLIP (``lora_te2_``, ``text_encoder_2.``) means SDXL, and one CLIP
  alone (no denoiser layers) not SDXL; the CLIPs' widths narrow further. T5 layers alone
  leave SD3 and FLUX.1 open.

Each piece of evidence narrows the set of candidate families; contradictions give
``unknown``, as does anything unrecognised: then the size check at generation decides.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from app.cores.lora_files.safetensors_file import SafetensorsHeader
from app.cores.model_manager.model_family import (
    ATTENTION_WIDTHS,
    CROSS_ATTENTION_FAMILIES,
    SECOND_TEXT_ENCODER_WIDTHS,
    T5_WIDTHS,
    TEXT_ENCODER_WIDTHS,
    TRANSFORMER_WIDTHS,
    UNET_BLOCK_WIDTHS,
    ModelFamily,
    transformer_family,
)

F = ModelFamily
_UNET_FAMILIES = frozenset(f for f in F if f.architecture in (F.SD1, F.SD2, F.SDXL))
_FLUX_MAX_DOUBLE, _FLUX_MAX_SINGLE = 18, 37
_SD3_MAX_BLOCK = 37

# A LoRA layer is a down/A matrix (rank x input width) with its up/B matrix (output x rank).
_DOWN = re.compile(r"(?:[._]lora)?(?:\.lora_linear_layer)?\.(?:lora_down|lora_A|down)\.weight$")
_LYCORIS = re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2|diff)$")

_CROSS_KV = re.compile(r"attn2_(?:processor_)?to_[kv]$")
_ATTENTION = re.compile(r"attn[12]_(?:processor_)?to_(?:q|k|v|out(?:_0)?)$")
_RESNET = re.compile(r"(?:resnets_\d+_conv[12]|_0_in_layers_2|_0_out_layers_3)$")  # diffusers, SGM
_DEEP_BLOCK = re.compile(r"transformer_blocks_([1-9]\d*)_attn[12]_")
_TEXT_HIDDEN = re.compile(r"(?:self_attn_(?:[qkv]|out)_proj|self_attn_to_(?:[qkv]|out)|mlp_fc1)$")
_T5 = re.compile(r"(?:^|_)encoder_block_\d+_layer_\d+_")
_T5_HIDDEN = re.compile(r"(?:SelfAttention_[qkv]|DenseReluDense_wi(?:_[01])?)$")

_FLUX_NAMES = re.compile(
    r"(?:^|_)(?:double_blocks_(\d+)_(?:img|txt|processor)_"
    r"|single_blocks_(\d+)_(?:linear[12]|modulation|processor))"
)
_SINGLE_STREAM = re.compile(r"(?:^|_)single_transformer_blocks_(\d+)_")
_AURAFLOW = re.compile(r"(?:^|_)joint_transformer_blocks_")
_SD3_NAMES = re.compile(r"(?:^|_)joint_blocks_(\d+)_(?:x_block|context_block)_")
_DUAL_STREAM = re.compile(r"(?<!single_)(?<!joint_)transformer_blocks_(\d+)_attn_add_[qkv]_proj")
# Layers whose input (queries) or output (projections back) is the transformer's hidden width.
_MMDIT_QUERY = re.compile(
    r"(?:img_attn_qkv|txt_attn_qkv|attn_qkv|attn_to_[qkv]|attn_add_[qkv]_proj|linear1|proj_mlp"
    r"|processor_qkv_lora\d?)$"
)
_MMDIT_OUTPUT = re.compile(
    r"(?:attn_proj|linear2|attn_to_out_0|attn_to_add_out|processor_proj_lora\d?)$"
)

_COMPONENT_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_transformer_", "transformer"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
    ("unet_", "unet"),
    ("transformer_", "transformer"),
    ("diffusion_model_", "transformer"),
    ("text_encoder_2_", "te2"),
    ("text_encoder_3_", "te3"),
    ("text_encoder_", "te1"),
)


@dataclass(frozen=True)
class _Layer:
    component: str
    """``unet``, ``transformer``, ``te1``, ``te2``, ``te3`` or ``other`` (no known prefix).
    Kohya names every denoiser ``lora_unet_``, MMDiT ones included."""
    name: str
    """Module name with every ``.`` as ``_`` (Kohya and diffusers names look alike)."""
    width_in: int
    width_out: int | None

    @property
    def t5(self) -> bool:
        return _T5.search(self.name) is not None


@dataclass(frozen=True)
class Detection:
    family: ModelFamily
    candidates: frozenset[ModelFamily]
    """Families the shapes leave possible when ``family`` is unknown (may be empty)."""
    evidence: str
    """Why, in a short sentence fragment: shown to users next to the family."""


def _layer(stem: str, width_in: int, width_out: int | None) -> _Layer:
    name = stem.replace(".", "_")
    for prefix, component in _COMPONENT_PREFIXES:
        if name.startswith(prefix):
            return _Layer(component, name[len(prefix) :], width_in, width_out)
    return _Layer("other", name, width_in, width_out)


def _up_key(key: str, down_suffix: str) -> str:
    up_suffix = down_suffix.replace("lora_down.", "lora_up.").replace("lora_A.", "lora_B.")
    if up_suffix == down_suffix:
        up_suffix = down_suffix[: -len("down.weight")] + "up.weight"
    return key[: len(key) - len(down_suffix)] + up_suffix


def _matrix(roles: Mapping[str, tuple[int, ...]], full: str, core: str) -> tuple[int, int] | None:
    """(rows, columns) of a LyCORIS factor stored whole (``full``) or as ``full_a @ full_b``;
    beside a Tucker ``core`` (conv layers) ``full_a`` is stored transposed, (rank x rows)."""
    whole, a, b = roles.get(full), roles.get(f"{full}_a"), roles.get(f"{full}_b")
    if whole is not None and len(whole) >= 2:
        return whole[0], whole[1]
    if a is not None and b is not None and len(a) >= 2 and len(b) >= 2:
        return (a[1] if core in roles else a[0]), b[1]
    return None


def _lycoris_widths(roles: Mapping[str, tuple[int, ...]]) -> tuple[int, int] | None:
    """(input, output) width of a LyCORIS layer; None when its tensors do not say."""
    diff = roles.get("diff")
    if diff is not None and len(diff) >= 2:
        return diff[1], diff[0]
    hada = _matrix(roles, "hada_w1", "hada_t1")  # the Hadamard factors have the layer's shape
    w1, w2 = _matrix(roles, "lokr_w1", ""), _matrix(roles, "lokr_w2", "lokr_t2")
    if hada is not None:
        return hada[1], hada[0]
    return (w1[1] * w2[1], w1[0] * w2[0]) if w1 is not None and w2 is not None else None


def _layers(header: SafetensorsHeader) -> list[_Layer]:
    layers = []
    lycoris: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, info in header.tensors.items():
        match = _DOWN.search(key)
        if match is not None and len(info.shape) >= 2:
            up = header.tensors.get(_up_key(key, key[match.start() :]))
            width_out = up.shape[0] if up is not None and up.shape else None
            layers.append(_layer(key[: match.start()], info.shape[1], width_out))
        elif (match := _LYCORIS.search(key)) is not None:
            lycoris.setdefault(key[: match.start()], {})[match[1]] = info.shape
    for stem, roles in lycoris.items():
        widths = _lycoris_widths(roles)
        if widths is not None:
            layers.append(_layer(stem, *widths))
    return layers


def _most_common(values: Iterable[int]) -> int | None:
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else None


def _unknown(evidence: str, candidates: Iterable[ModelFamily] = ()) -> Detection:
    return Detection(F.UNKNOWN, frozenset(candidates), evidence)


def _t5_width(layers: list[_Layer]) -> int | None:
    return _most_common(
        layer.width_in for layer in layers if layer.t5 and _T5_HIDDEN.search(layer.name)
    )


def _mmdit_width(layers: list[_Layer]) -> int | None:
    denoiser = [layer for layer in layers if layer.component in ("unet", "transformer", "other")]
    widths = [layer.width_in for layer in denoiser if _MMDIT_QUERY.search(layer.name)]
    widths += [
        layer.width_out
        for layer in denoiser
        if layer.width_out is not None and _MMDIT_OUTPUT.search(layer.name)
    ]
    return _most_common(widths)


def _sized(architecture: ModelFamily, width: int | None, blocks: str, tail: str = "") -> Detection:
    """The family of ``architecture`` that is ``width`` wide, or why none is."""
    family = transformer_family(architecture, width)
    if family.known:
        return Detection(family, frozenset({family}), f"{blocks} {width} wide{tail}")
    sizes = {f: w for f, w in TRANSFORMER_WIDTHS.items() if f.architecture is architecture}
    if width is None:
        return _unknown(f"{blocks} of no readable width", sizes)
    known = " or ".join(str(w) for f in sizes if not f.is_tiny for w in sorted(sizes[f]))
    return _unknown(f"{blocks} {width} wide, no {architecture.display_name} size ({known})")


def _detect_mmdit(names: list[str], layers: list[_Layer]) -> Detection | None:
    flux_blocks = [m for name in names for m in _FLUX_NAMES.finditer(name)]
    single = [int(m[1]) for name in names for m in _SINGLE_STREAM.finditer(name)]
    auraflow = any(_AURAFLOW.search(name) for name in names)
    sd3_blocks = [int(m[1]) for name in names for m in _SD3_NAMES.finditer(name)]
    dual = [int(m[1]) for name in names for m in _DUAL_STREAM.finditer(name)]
    width = _mmdit_width(layers)
    if flux_blocks or (single and not auraflow):
        double = [int(m[1]) for m in flux_blocks if m[1]] + dual
        single += [int(m[2]) for m in flux_blocks if m[2]]
        detection = _sized(F.FLUX, width, "FLUX-style double/single-stream blocks")
        too_many = max(double, default=0) > _FLUX_MAX_DOUBLE or max(single, default=0) > (
            _FLUX_MAX_SINGLE
        )
        if detection.family is F.FLUX and too_many:
            return _unknown("FLUX-style blocks numbered beyond FLUX.1's 19 double / 38 single")
    elif sd3_blocks or (dual and not auraflow):
        detection = _sized(F.SD3, width, "joint-attention blocks", ", no single-stream ones")
        if detection.family is F.SD3 and max(sd3_blocks + dual) > _SD3_MAX_BLOCK:
            return _unknown("joint-attention blocks numbered beyond Stable Diffusion 3's")
    elif auraflow or any(layer.component == "transformer" for layer in layers):
        return _unknown("transformer blocks of an unrecognised model")
    else:
        return None
    t5 = _t5_width(layers)
    if t5 is None or not detection.family.known:
        return detection
    evidence = f"{detection.evidence}; T5 text-encoder layers {t5} wide"
    if detection.family not in T5_WIDTHS.get(t5, frozenset()):
        return _unknown(f"contradictory shapes ({evidence})")
    return Detection(detection.family, detection.candidates, evidence)


def detect_base_model(header: SafetensorsHeader) -> Detection:
    """The family a LoRA was made for, from its header alone (see the module docstring)."""
    layers = _layers(header)
    names = [key.replace(".", "_") for key in header.tensors]
    mmdit = _detect_mmdit(names, layers)
    if mmdit is not None:
        return mmdit
    denoiser = [layer for layer in layers if layer.component == "unet"]
    text = [layer for layer in layers if layer.component in ("te1", "te2") and not layer.t5]
    t5 = _t5_width(layers)
    if t5 is not None:
        if denoiser:
            return _unknown(f"contradictory shapes (UNet layers beside T5 layers {t5} wide)")
        families = T5_WIDTHS.get(t5, frozenset())
        return _unknown(f"T5 text-encoder layers {t5} wide and no transformer layers", families)
    if not denoiser and not text:
        return _unknown("no layer the rules recognise")

    candidates = set(_UNET_FAMILIES)
    evidence: list[str] = []
    cross = [layer for layer in denoiser if _CROSS_KV.search(layer.name)]
    contexts = {layer.width_in for layer in cross}
    if len(contexts) > 1:
        return _unknown(f"cross-attention layers of different widths {sorted(contexts)}")
    if contexts:
        context = contexts.pop()
        family = CROSS_ATTENTION_FAMILIES.get(context)
        if family is None:
            return _unknown(f"cross-attention input width {context}, no known model's")
        candidates &= {family}
        evidence.append(f"cross-attention input width {context}")
    widths = {
        layer.width_in for layer in denoiser if _ATTENTION.search(layer.name) and layer not in cross
    } | {layer.width_out for layer in cross if layer.width_out is not None}
    if widths:
        candidates = {f for f in candidates if widths <= ATTENTION_WIDTHS[f]}
        evidence.append(f"attention widths {sorted(widths)}")
    blocks = {x.width_out for x in denoiser if x.width_out and _RESNET.search(x.name)}
    if blocks:  # a LoCon's resnet convolutions, by their output channels
        candidates = {f for f in candidates if blocks <= UNET_BLOCK_WIDTHS[f]}
        evidence.append(f"block widths {sorted(blocks)}")
    if any(_DEEP_BLOCK.search(layer.name) for layer in denoiser):
        candidates &= {F.SDXL}
        evidence.append("attention blocks deeper than one transformer block")
    for component, table in (("te1", TEXT_ENCODER_WIDTHS), ("te2", SECOND_TEXT_ENCODER_WIDTHS)):
        encoder = [layer for layer in text if layer.component == component]
        if component == "te2" and encoder:
            candidates &= {F.SDXL, F.TINY_SDXL}
            evidence.append("layers for a second text encoder")
        hidden = _most_common(x.width_in for x in encoder if _TEXT_HIDDEN.search(x.name))
        if hidden is not None:
            candidates &= table.get(hidden, frozenset())
            which = "second " if component == "te2" else ""
            evidence.append(f"{which}text-encoder width {hidden}")
        if not denoiser and encoder and component == "te1" and len(text) == len(encoder):
            # SDXL trainers (sd-scripts, diffusers) give both encoders layers, or none.
            candidates -= {F.SDXL, F.TINY_SDXL}
            evidence.append("layers for one text encoder only")

    reason = "; ".join(evidence) or "no layer that tells the models apart"
    if not candidates:
        return _unknown(f"contradictory shapes ({reason})")
    if len(candidates) == 1:
        return Detection(next(iter(candidates)), frozenset(candidates), reason)
    if F.TINY in candidates and all(f.is_tiny for f in candidates):
        # The tiny UNets share their block widths; only the text widths tell them apart. The
        # embedded model is the one the server ships, the others exist only in the test suite.
        return Detection(F.TINY, frozenset(candidates), f"{reason}; the embedded model's widths")
    return _unknown(reason, candidates)
