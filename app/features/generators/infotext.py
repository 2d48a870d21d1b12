"""A1111-style "parameters" text for PNGs, which CivitAI and A1111's PNG Info read."""

from __future__ import annotations

from PIL.PngImagePlugin import PngInfo

from app.features.generators.samplers import list_samplers
from app.features.generators.schemas import GeneratorConfig

_SAMPLER_NAMES = {info.value: info.name for info in list_samplers()}


def _clean(text: str) -> str:
    return text.replace("\r", " ").strip()


def build_infotext(config: GeneratorConfig, seed: int, model: str, width: int, height: int) -> str:
    fields: list[tuple[str, object]] = [
        ("Steps", config.steps),
        ("Sampler", _SAMPLER_NAMES[config.sampler]),
        ("CFG scale", config.cfg_scale),
        ("Seed", seed),
        ("Size", f"{width}x{height}"),
        ("Model", model),
    ]
    if config.clip_skip > 1:
        fields.append(("Clip skip", config.clip_skip))
    if config.hires_fix is not None:
        fields += [
            ("Denoising strength", config.hires_fix.denoising_strength),
            ("Hires upscale", config.hires_fix.upscale_factor),
            ("Hires steps", config.hires_fix.steps),
            ("Hires upscaler", config.hires_fix.upscaler.value),
        ]
    lines = [_clean(config.prompt)]
    if config.negative_prompt:
        lines.append(f"Negative prompt: {_clean(config.negative_prompt)}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def png_info(text: str) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", text)
    return info
