"""Which model family a LoRA was made for, from its keys and tensor shapes.

The safetensors metadata often says (``ss_base_model_version``, ``modelspec.architecture``),
but it is missing from many files and wrong in some (copied from another training run,
merged files, hand-edited headers). The layers themselves cannot lie: a LoRA layer's input
width is the width of the layer it was trained on. So the family is decided from the header
(names, shapes; no tensor data), and the metadata's claim is kept beside it, used only to
choose between families the shapes leave open, and reported when it disagrees.

Rules (key names as trainers write them and as diffusers 0.42's ``lora_conversion_utils``
converts them; widths from the models' configs):

* MMDiT models, recognised by block names first. FLUX.1: ``double_blocks_N_{img,txt}_*`` /
  ``single_blocks_N_{linear1,linear2,modulation}`` (Kohya and BFL names, see
  ``_convert_kohya_flux_lora_to_diffusers``) or diffusers' ``single_transformer_blocks.N``
  (without AuraFlow's ``joint_transformer_blocks``); 3072 wide, at most 19 double and 38
  single blocks (HunyuanVideo reuses the names with more blocks). SD3: ``joint_blocks_N_
  {x_block,context_block}`` (SAI/Kohya) or diffusers' ``transformer_blocks.N.attn.add_q_proj``
  with no single-stream blocks; 1536 (3/3.5 Medium) or 2432 (3.5 Large) wide.
* UNet models. The input width of a cross-attention key/value projection (``attn2.to_k``,
  ``attn2_to_v``, ``attn2.processor.to_k_lora``) is the text encoder's hidden size: 768 for
  SD 1.x, 1024 for SD 2.x, 2048 for SDXL, 32 for the tiny embedded model. The attention
  widths must agree (SD 1.x/2.x: 320/640/1280; SDXL has no 320-wide attention; tiny: 32/64);
  attention blocks deeper than one transformer block (``transformer_blocks.1``...) exist only
  in SDXL.
* Text encoders: a second one (``lora_te2_``, ``text_encoder_2.``) means SDXL; the first one's
  width is 768 (SD 1.x or SDXL's CLIP-L), 1024 (SD 2.x) or 32 (tiny).

Each piece of evidence narrows the set of candidate families; contradictions give
``unknown``, as does anything unrecognised: then the size check at generation decides.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from app.cores.model_manager.model_family import CROSS_ATTENTION_FAMILIES, ModelFamily
from app.features.loras.safetensors_file import SafetensorsHeader

F = ModelFamily
_UNET_FAMILIES = frozenset({F.SD1, F.SD2, F.SDXL, F.TINY})
_ATTENTION_WIDTHS = {
    F.SD1: frozenset({320, 640, 1280}),
    F.SD2: frozenset({320, 640, 1280}),
    F.SDXL: frozenset({640, 1280}),
    F.TINY: frozenset({32, 64}),
}
_TEXT_ENCODER_WIDTHS = {
    768: frozenset({F.SD1, F.SDXL}),
    1024: frozenset({F.SD2}),
    32: frozenset({F.TINY}),
}
_FLUX_WIDTH = 3072
_FLUX_MAX_DOUBLE, _FLUX_MAX_SINGLE = 18, 37
_SD3_WIDTHS = frozenset({1536, 2432})
_SD3_MAX_BLOCK = 37

# A LoRA layer is a down/A matrix (rank x input width) with its up/B matrix (output x rank).
_DOWN = re.compile(r"(?:[._]lora)?(?:\.lora_linear_layer)?\.(?:lora_down|lora_A|down)\.weight$")

_CROSS_KV = re.compile(r"attn2_(?:processor_)?to_[kv]$")
_ATTENTION = re.compile(r"attn[12]_(?:processor_)?to_(?:q|k|v|out(?:_0)?)$")
_DEEP_BLOCK = re.compile(r"transformer_blocks_([1-9]\d*)_attn[12]_")
_TEXT_HIDDEN = re.compile(r"(?:self_attn_(?:[qkv]|out)_proj|self_attn_to_(?:[qkv]|out)|mlp_fc1)$")

_FLUX_NAMES = re.compile(
    r"(?:^|_)(?:double_blocks_(\d+)_(?:img|txt)_|single_blocks_(\d+)_(?:linear[12]|modulation))"
)
_SINGLE_STREAM = re.compile(r"(?:^|_)single_transformer_blocks_(\d+)_")
_AURAFLOW = re.compile(r"(?:^|_)joint_transformer_blocks_")
_SD3_NAMES = re.compile(r"(?:^|_)joint_blocks_(\d+)_(?:x_block|context_block)_")
_DUAL_STREAM = re.compile(r"(?<!single_)(?<!joint_)transformer_blocks_(\d+)_attn_add_[qkv]_proj")
_MMDIT_QUERY = re.compile(
    r"(?:img_attn_qkv|txt_attn_qkv|attn_qkv|attn_to_[qkv]|attn_add_[qkv]_proj|linear1|proj_mlp)$"
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


@dataclass(frozen=True)
class Detection:
    family: ModelFamily
    candidates: frozenset[ModelFamily]
    """Families the shapes leave possible when ``family`` is unknown (may be empty)."""
    evidence: str
    """Why, in a short sentence fragment: shown to users next to the family."""


@dataclass(frozen=True)
class MetadataClaim:
    family: ModelFamily
    key: str
    value: str


@dataclass(frozen=True)
class BaseModel:
    family: ModelFamily
    evidence: str
    claim: MetadataClaim | None

    @property
    def conflict(self) -> bool:
        """The metadata names a known family other than the one the shapes show."""
        claim = self.claim
        return (
            claim is not None
            and claim.family.known
            and self.family.known
            and claim.family != self.family
        )


def _split_component(name: str) -> tuple[str, str]:
    for prefix, component in _COMPONENT_PREFIXES:
        if name.startswith(prefix):
            return component, name[len(prefix) :]
    return "other", name


def _up_key(key: str, down_suffix: str) -> str:
    up_suffix = down_suffix.replace("lora_down.", "lora_up.").replace("lora_A.", "lora_B.")
    if up_suffix == down_suffix:
        up_suffix = down_suffix[: -len("down.weight")] + "up.weight"
    return key[: len(key) - len(down_suffix)] + up_suffix


def _layers(header: SafetensorsHeader) -> list[_Layer]:
    layers = []
    for key, info in header.tensors.items():
        match = _DOWN.search(key)
        if match is None or len(info.shape) < 2:
            continue
        up = header.tensors.get(_up_key(key, key[match.start() :]))
        component, name = _split_component(key[: match.start()].replace(".", "_"))
        width_out = up.shape[0] if up is not None and up.shape else None
        layers.append(_Layer(component, name, info.shape[1], width_out))
    return layers


def _most_common(values: Iterable[int]) -> int | None:
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else None


def _unknown(evidence: str, candidates: Iterable[ModelFamily] = ()) -> Detection:
    return Detection(F.UNKNOWN, frozenset(candidates), evidence)


def _detect_mmdit(names: list[str], layers: list[_Layer]) -> Detection | None:
    flux_blocks = [m for name in names for m in _FLUX_NAMES.finditer(name)]
    single = [int(m[1]) for name in names for m in _SINGLE_STREAM.finditer(name)]
    auraflow = any(_AURAFLOW.search(name) for name in names)
    sd3_blocks = [int(m[1]) for name in names for m in _SD3_NAMES.finditer(name)]
    dual = [int(m[1]) for name in names for m in _DUAL_STREAM.finditer(name)]
    width = _most_common(
        layer.width_in
        for layer in layers
        if layer.component in ("unet", "transformer", "other") and _MMDIT_QUERY.search(layer.name)
    )
    if flux_blocks or (single and not auraflow):
        double = [int(m[1]) for m in flux_blocks if m[1]] + dual
        single += [int(m[2]) for m in flux_blocks if m[2]]
        if width is not None and width != _FLUX_WIDTH:
            return _unknown(f"FLUX-style blocks {width} wide (FLUX.1 is {_FLUX_WIDTH})")
        if max(double, default=0) > _FLUX_MAX_DOUBLE or max(single, default=0) > _FLUX_MAX_SINGLE:
            return _unknown("FLUX-style blocks numbered beyond FLUX.1's 19 double / 38 single")
        return Detection(F.FLUX, frozenset({F.FLUX}), "double/single-stream transformer blocks")
    if sd3_blocks or (dual and not auraflow):
        if width is not None and width not in _SD3_WIDTHS:
            return _unknown(f"joint-attention blocks {width} wide, no Stable Diffusion 3 size")
        if max(sd3_blocks + dual) > _SD3_MAX_BLOCK:
            return _unknown("joint-attention blocks numbered beyond Stable Diffusion 3's")
        return Detection(F.SD3, frozenset({F.SD3}), "joint-attention blocks without single-stream")
    if auraflow or any(layer.component == "transformer" for layer in layers):
        return _unknown("transformer blocks of an unrecognised model")
    return None


def detect_base_model(header: SafetensorsHeader) -> Detection:
    """The family a LoRA was made for, from its header alone (see the module docstring)."""
    layers = _layers(header)
    names = [key.replace(".", "_") for key in header.tensors]
    mmdit = _detect_mmdit(names, layers)
    if mmdit is not None:
        return mmdit
    denoiser = [layer for layer in layers if layer.component == "unet"]
    text = [layer for layer in layers if layer.component in ("te1", "te2")]
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
        candidates = {f for f in candidates if widths <= _ATTENTION_WIDTHS[f]}
        evidence.append(f"attention widths {sorted(widths)}")
    if any(_DEEP_BLOCK.search(layer.name) for layer in denoiser):
        candidates &= {F.SDXL}
        evidence.append("attention blocks deeper than one transformer block")
    if any(layer.component == "te2" for layer in text):
        candidates &= {F.SDXL}
        evidence.append("layers for a second text encoder")
    hidden = _most_common(
        layer.width_in
        for layer in text
        if layer.component == "te1" and _TEXT_HIDDEN.search(layer.name)
    )
    if hidden is not None:
        candidates &= _TEXT_ENCODER_WIDTHS.get(hidden, frozenset())
        evidence.append(f"text-encoder width {hidden}")

    reason = "; ".join(evidence) or "no layer that tells the models apart"
    if not candidates:
        return _unknown(f"contradictory shapes ({reason})")
    if len(candidates) == 1:
        return Detection(next(iter(candidates)), frozenset(candidates), reason)
    return _unknown(reason, candidates)


# ---------------------------------------------------------------------------------------------
# What the metadata claims


def _family_from_label(label: str) -> ModelFamily:
    """``modelspec.architecture`` / ``ss_base_model_version`` values (sd-scripts' names)."""
    value = label.strip().lower()
    if "flux" in value:
        return F.FLUX
    if "stable-diffusion-xl" in value or value.startswith("sdxl"):
        return F.SDXL
    if "stable-diffusion-3" in value or value.startswith("sd3"):
        return F.SD3
    if "stable-diffusion-v2" in value or value.startswith(("sd_v2", "sd2", "sd_2")):
        return F.SD2
    if "stable-diffusion-v1" in value or value.startswith(("sd_v1", "sd1", "sd_1")):
        return F.SD1
    return F.UNKNOWN


_MODEL_NAME_HINTS = (
    (re.compile(r"flux"), F.FLUX),
    (re.compile(r"xl|pony|illustrious"), F.SDXL),
    (re.compile(r"sd3|sd_3|stable-diffusion-3|sd3\.5"), F.SD3),
    (re.compile(r"v2-|v2_|sd2|sd_2|768-v|2[-._]1"), F.SD2),
    (re.compile(r"v1-|v1_|sd15|sd_15|sd1|1[-._]5|sd-v1"), F.SD1),
)


def metadata_claim(metadata: Mapping[str, str]) -> MetadataClaim | None:
    """The family the metadata names, strongest field first; None when it names none."""
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = metadata.get(key, "").strip()
        if value:
            return MetadataClaim(_family_from_label(value), key, value[:200])
    if metadata.get("ss_v2", "").strip() == "True":
        return MetadataClaim(F.SD2, "ss_v2", "True")
    name = metadata.get("ss_sd_model_name", "").strip()
    lowered = name.lower()
    for pattern, family in _MODEL_NAME_HINTS:
        if pattern.search(lowered):
            return MetadataClaim(family, "ss_sd_model_name", name[:200])
    return None


def resolve_base_model(detection: Detection, claim: MetadataClaim | None) -> BaseModel:
    """The shapes decide; the metadata only chooses among the families they leave open."""
    if detection.family.known or claim is None or claim.family not in detection.candidates:
        return BaseModel(detection.family, detection.evidence, claim)
    evidence = f"{detection.evidence}; chosen by its metadata ({claim.key}: {claim.value})"
    return BaseModel(claim.family, evidence, claim)


def base_model_of(header: SafetensorsHeader) -> BaseModel:
    return resolve_base_model(detect_base_model(header), metadata_claim(header.metadata))


def conflict_note(base: BaseModel) -> str | None:
    """A sentence for the UI when the metadata and the shapes disagree."""
    claim = base.claim
    if claim is None or not base.conflict:
        return None
    return (
        f"The file's metadata ({claim.key}: {claim.value}) says {claim.family.display_name}, "
        f"but its layers are shaped for {base.family.display_name}."
    )


# ---------------------------------------------------------------------------------------------
# Compatibility with the loaded model


def is_compatible(lora: str | None, model: ModelFamily | None) -> bool | None:
    """True/False when both families are known; None when either is not."""
    if model is None or not model.known or lora is None or lora == F.UNKNOWN.value:
        return None
    return lora == model.value


def incompatibility_message(name: str, lora: ModelFamily, model: ModelFamily) -> str:
    return (
        f"LoRA '{name}' was made for {lora.display_name}; the loaded model is "
        f"{model.display_name}. Load a {lora.display_name} model to use it, or choose LoRAs "
        f"made for {model.display_name}."
    )
