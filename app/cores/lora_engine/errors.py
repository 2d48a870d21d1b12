"""The engine's one error: a requested LoRA cannot be applied to the loaded model."""

from __future__ import annotations

from app.exceptions import BadRequestError


class LoRAIncompatibleError(BadRequestError):
    """A requested LoRA cannot be used with the loaded model (another family, layers the model
    does not have, other sizes, or a file that is not a readable LoRA); the message names
    the LoRA and says why."""
