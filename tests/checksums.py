"""The one weights checksum: proves that a LoRA left the model bit-identical to its base, and
no adapter layer behind."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI

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


def adapter_layers(pipeline: Any) -> int:
    """How many PEFT adapter layers (``lora_A``) the denoiser and text encoders hold."""
    return sum(
        1
        for component_name in DENOISERS_AND_ENCODERS
        if isinstance(component := getattr(pipeline, component_name, None), torch.nn.Module)
        for module in component.modules()
        if hasattr(module, "lora_A")
    )


async def loaded_pipeline_state(app: FastAPI) -> tuple[str, int]:
    """``weights_checksum`` and ``adapter_layers`` of the app's loaded pipeline, read under
    the pipeline lock (so after any generation that holds it has cleaned up)."""
    state: tuple[str, int] = await app.state.model_manager.run(
        lambda loaded: (weights_checksum(loaded.pipeline), adapter_layers(loaded.pipeline))
    )
    return state


def payload_sha256(path: Path) -> str:
    """sha256 of a safetensors file's tensor bytes, its header left out (what A1111's
    AutoV3 hash and ``tensor_sha256`` are made of)."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0] :]).hexdigest()
