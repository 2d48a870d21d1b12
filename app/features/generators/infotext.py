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
from dataclasses import dataclass

from PIL.PngImagePlugin import PngInfo

from app.features.generators.samplers import list_samplers
from app.features.generators.schemas import GeneratorConfig

_SAMPLER_NAMES = {info.value: info.name for info in list_samplers()}
# A1111 drops ":" and "," from a LoRA's name in "Lora hashes"; "<" and ">" would also end a
# <lora:...> token early, and a newline would end the prompt line.
_NAME_BREAKERS = re.compile(r"[:,<>]")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class InfotextLoRA:
    name: str
    weight: float
    short_hash: str | None
    """AutoV3; None leaves the LoRA out of ``Lora hashes`` (A1111 does the same)."""
    text_encoder_weight: float | None = None
    unet_weight: float | None = None

    def token(self) -> str:
        """``<lora:NAME:W>``, or A1111's ``<lora:NAME:TE:UNET>`` when the components differ."""
        if self.text_encoder_weight is None and self.unet_weight is None:
            return f"<lora:{lora_alias(self.name)}:{_weight(self.weight)}>"
        te = self.weight if self.text_encoder_weight is None else self.text_encoder_weight
        unet = self.weight if self.unet_weight is None else self.unet_weight
        return f"<lora:{lora_alias(self.name)}:{_weight(te)}:{_weight(unet)}>"


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
    loras: Sequence[InfotextLoRA] = (),
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
    hashes = [f"{lora_alias(lora.name)}: {lora.short_hash}" for lora in loras if lora.short_hash]
    if hashes:
        fields.append(("Lora hashes", ", ".join(hashes)))
    tokens = " ".join(lora.token() for lora in loras)
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
