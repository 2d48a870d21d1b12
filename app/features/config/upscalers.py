"""The upscalers the hires fix offers. Traditional ones resize with Pillow; the AI ones
(Real-ESRGAN) are listed because the UI shows them, and refused until they are installed."""

from __future__ import annotations

from enum import StrEnum

from PIL import Image

from app.features.config.schemas import UpscalerOption, UpscalerSection


class Upscaler(StrEnum):
    LANCZOS = "Lanczos"
    BICUBIC = "Bicubic"
    BILINEAR = "Bilinear"
    NEAREST = "Nearest"
    REALESRGAN_X2PLUS = "RealESRGAN_x2plus"
    REALESRGAN_X4PLUS = "RealESRGAN_x4plus"
    REALESRGAN_X4PLUS_ANIME = "RealESRGAN_x4plus_anime"


PIL_RESAMPLING: dict[Upscaler, Image.Resampling] = {
    Upscaler.LANCZOS: Image.Resampling.LANCZOS,
    Upscaler.BICUBIC: Image.Resampling.BICUBIC,
    Upscaler.BILINEAR: Image.Resampling.BILINEAR,
    Upscaler.NEAREST: Image.Resampling.NEAREST,
}

_TRADITIONAL = [
    (Upscaler.LANCZOS, "Lanczos", "Sharp resampling; the best of the classic filters.", 0.4),
    (Upscaler.BICUBIC, "Bicubic", "Smooth resampling with mild sharpening.", 0.45),
    (Upscaler.BILINEAR, "Bilinear", "Soft, fast resampling.", 0.5),
    (Upscaler.NEAREST, "Nearest", "Blocky pixel copy; needs a strong denoise.", 0.6),
]
_AI = [
    (Upscaler.REALESRGAN_X2PLUS, "Real-ESRGAN x2+", "AI upscaler, 2x (not installed).", 0.3),
    (Upscaler.REALESRGAN_X4PLUS, "Real-ESRGAN x4+", "AI upscaler, 4x (not installed).", 0.3),
    (Upscaler.REALESRGAN_X4PLUS_ANIME, "Real-ESRGAN x4+ Anime", "Anime, 4x (not installed).", 0.3),
]


def upscaler_sections() -> list[UpscalerSection]:
    def options(rows: list[tuple[Upscaler, str, str, float]], method: str) -> list[UpscalerOption]:
        return [
            UpscalerOption(
                value=value,
                name=name,
                description=text,
                suggested_denoise_strength=strength,
                method=method,
                is_recommended=value is Upscaler.LANCZOS,
            )
            for value, name, text, strength in rows
        ]

    return [
        UpscalerSection(
            method="traditional", title="Traditional", options=options(_TRADITIONAL, "traditional")
        ),
        UpscalerSection(method="ai", title="AI upscalers", options=options(_AI, "ai")),
    ]
