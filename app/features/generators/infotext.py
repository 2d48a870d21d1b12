"""A1111-style "parameters" text for PNGs, which CivitAI and A1111's PNG Info read.

The format, as A1111 writes it (``modules/processing.py: create_infotext``) and parses it
(``parse_generation_parameters``): the prompt (LoRAs appear in it as ``<lora:NAME:WEIGHT>``
tokens), then ``Negative prompt: ...`` when there is one, then one last line of
``Key: value`` pairs joined by ``", "``. A value holding a comma, colon or newline is written
as a JSON string (A1111's ``quote``), so ``Lora hashes: "a: 0123456789ab, b: ba9876543210"``
reads back as one field.

Hashes: ``Model hash`` is the model's 10-hex-digit short hash (``model_hash``);
``Lora hashes`` maps each LoRA's name to the first 12 hex digits of the sha256 of its tensor
data (AutoV3), which is what A1111 writes and CivitAI resolves (see ``loras.hashes``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from PIL.PngImagePlugin import PngInfo

from app.cores.lora_engine import LoRARequest
from app.cores.lora_files.hashes import autov3
from app.features.generators.samplers import list_samplers
from app.features.generators.schemas import GeneratorConfig

_SAMPLER_NAMES = {info.value: info.name for info in list_samplers()}
# A1111 drops ":" and "," from a LoRA's name in "Lora hashes"; "<" and ">" would also end a
# <lora:...> token early, and a newline would end the prompt line.
_NAME_BREAKERS = re.compile(r"[:,<>]")
_WHITESPACE = re.compile(r"\s+")


def lora_token(lora: LoRARequest) -> str:
    """``<lora:NAME:W>``, or A1111's ``<lora:NAME:TE:UNET>`` when the components differ."""
    if lora.text_encoder_weight is None and lora.unet_weight is None:
        return f"<lora:{lora_alias(lora.name)}:{_weight(lora.weight)}>"
    te, unet = lora.weight_for("text_encoder"), lora.weight_for("unet")
    return f"<lora:{lora_alias(lora.name)}:{_weight(te)}:{_weight(unet)}>"


def _clean(text: str) -> str:
    return text.replace("\r", " ").strip()


def lora_alias(name: str) -> str:
    """The name as it appears in ``<lora:NAME:W>`` and ``Lora hashes``."""
    return _WHITESPACE.sub(" ", _NAME_BREAKERS.sub("", name)).strip() or "lora"


def quote(value: object) -> str:
    """A1111's ``quote``: JSON-quote a value that would break the ``Key: value, ...`` line."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _weight(weight: float) -> str:
    return f"{weight:g}"


def build_infotext(
    config: GeneratorConfig,
    seed: int,
    model: str,
    width: int,
    height: int,
    *,
    model_hash: str | None = None,
    loras: Sequence[LoRARequest] = (),
) -> str:
    fields: list[tuple[str, object]] = [
        ("Steps", config.steps),
        ("Sampler", _SAMPLER_NAMES[config.sampler]),
        ("CFG scale", config.cfg_scale),
        ("Seed", seed),
        ("Size", f"{width}x{height}"),
    ]
    if model_hash:
        fields.append(("Model hash", model_hash))
    fields.append(("Model", model))
    if config.clip_skip > 1:
        fields.append(("Clip skip", config.clip_skip))
    if config.hires_fix is not None:
        fields += [
            ("Denoising strength", config.hires_fix.denoising_strength),
            ("Hires upscale", config.hires_fix.upscale_factor),
            ("Hires steps", config.hires_fix.steps),
            ("Hires upscaler", config.hires_fix.upscaler.value),
        ]
    # A LoRA without an AutoV3 hash is left out of ``Lora hashes``, as A1111 does.
    hashes = [
        f"{lora_alias(lora.name)}: {short}"
        for lora in loras
        if (short := autov3(lora.tensor_sha256))
    ]
    if hashes:
        fields.append(("Lora hashes", ", ".join(hashes)))
    tokens = " ".join(lora_token(lora) for lora in loras)
    prompt = " ".join(part for part in (_clean(config.prompt), tokens) if part)
    lines = [prompt]
    if config.negative_prompt:
        lines.append(f"Negative prompt: {_clean(config.negative_prompt)}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields))
    return "\n".join(lines)


def png_info(text: str) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", text)
    return info
