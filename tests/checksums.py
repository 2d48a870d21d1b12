"""The one weights checksum: proves that a LoRA left the model bit-identical to its base."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

DENOISERS_AND_ENCODERS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def weights_checksum(pipeline: Any) -> str:
    """sha256 over every tensor of the denoiser and the text encoders a diffusers pipeline
    has, by component and name, in a fixed order (the bytes, not the values: -0.0 != 0.0)."""
    digest = hashlib.sha256()
    for component_name in DENOISERS_AND_ENCODERS:
        component = getattr(pipeline, component_name, None)
        if not isinstance(component, torch.nn.Module):
            continue
        for name, tensor in sorted(component.state_dict().items()):
            digest.update(f"{component_name}.{name}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
