"""A LoRA as one request uses it: the one type routes, generation, the engine and the PNG
infotext share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoRARequest:
    """One LoRA of a generation request, with the weights the user chose.

    ``weight`` applies to every component unless ``unet_weight`` (the UNet or transformer)
    or ``text_encoder_weight`` (every text encoder) overrides it.
    """

    id: int
    name: str
    path: Path
    content_key: str
    """Identifies the file's content (its sha256): a changed file is a different LoRA."""
    weight: float = 1.0
    unet_weight: float | None = None
    text_encoder_weight: float | None = None
    base_model: str | None = None
    """The family the LoRA was made for, as detected at upload (``ModelFamily`` value)."""
    tensor_sha256: str | None = None
    """A1111's LoRA hash (of the tensor data), for the PNG infotext."""

    def weight_for(self, component: str) -> float:
        is_text = component.startswith("text_encoder")
        override = self.text_encoder_weight if is_text else self.unet_weight
        return self.weight if override is None else override

    def describe_weight(self) -> str:
        if self.unet_weight is None and self.text_encoder_weight is None:
            return f"weight {self.weight}"
        return (
            f"weight {self.weight}; unet {self.weight_for('unet')}, "
            f"text encoder {self.weight_for('text_encoder')}"
        )
