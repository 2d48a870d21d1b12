"""The upscalers the hires fix offers. Traditional ones resize with Pillow. The AI ones
(Real-ESRGAN) are contract values but not installed: they are refused, and not listed in
``/config/`` (the UI picks ``RealESRGAN_x2plus`` whenever it is listed), so that everything
the UI can choose runs on this machine."""

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
    ]
