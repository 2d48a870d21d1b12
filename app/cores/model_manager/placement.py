"""Where a model's weights live while it is loaded, and in which precision.

A model whose weights fit the user's share of the GPU (``gpu_scale_factor`` x its memory,
less a reserve for a generation's working memory) is moved there whole. One that does not
still runs: with diffusers' model CPU offload each component (text encoders, denoiser, VAE)
moves to the GPU only while it runs, which needs the largest component to fit; when even
that does not fit, sequential offload streams the weights layer by layer (slow, but it
runs). The load's progress messages say which was chosen and why.

Precision: half precision on CUDA. SD3's and FLUX.1's T5-XXL text encoder overflows float16
(its activations exceed 65504 and the image comes out black), so those families run in
bfloat16 where the GPU has it (every NVIDIA GPU since Ampere), which keeps float32's range at
half the memory; without bfloat16 they stay in float16 (the older GPUs' only choice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

GiB = 1024**3

WORKING_RESERVE_BYTES = 3 * GiB // 2
"""Kept free of weights for one generation's activations at the default size."""

_T5_PIPELINES = ("StableDiffusion3", "Flux")


class Placement(StrEnum):
    ON_DEVICE = "on_device"
    MODEL_OFFLOAD = "model_offload"
    SEQUENTIAL_OFFLOAD = "sequential_offload"


@dataclass(frozen=True)
class PlacementPlan:
    placement: Placement
    message: str
    """For the ``model_load_progress`` event: what was chosen, and why when it is not the
    plain one."""


def _gib(value: float) -> str:
    return f"{value / GiB:.1f} GiB"


def plan_placement(
    device: torch.device,
    weights: int,
    largest_component: int,
    device_memory: int | None,
    share: float,
) -> PlacementPlan:
    """Choose how to place ``weights`` bytes (``largest_component`` of them in one model) on
    ``device`` with ``device_memory`` bytes of which the user allows ``share``."""
    if device.type != "cuda" or device_memory is None:
        return PlacementPlan(Placement.ON_DEVICE, f"Moving the model to {device}")
    allowed = int(device_memory * share)
    room = allowed - WORKING_RESERVE_BYTES
    if weights <= room:
        return PlacementPlan(Placement.ON_DEVICE, f"Moving the model to {device}")
    reserve = _gib(WORKING_RESERVE_BYTES)
    why = (
        f"the model's {_gib(weights)} of weights do not fit the {_gib(allowed)} of {device} "
        f"the backend may use ({share:g} x {_gib(device_memory)}, less {reserve} for generating)"
    )
    if largest_component <= room:
        return PlacementPlan(
            Placement.MODEL_OFFLOAD,
            f"Model CPU offload: {why}; each part moves to the GPU only while it runs",
        )
    return PlacementPlan(
        Placement.SEQUENTIAL_OFFLOAD,
        f"Sequential CPU offload: {why}, and its largest part ({_gib(largest_component)}) "
        "does not fit either; weights stream to the GPU layer by layer (slow)",
    )


def component_bytes(pipeline: Any) -> list[int]:
    """Bytes of the weights of each of the pipeline's models."""
    return [
        sum(p.numel() * p.element_size() for p in module.parameters())
        for module in pipeline.components.values()
        if isinstance(module, torch.nn.Module)
    ]


def pipeline_class(source: Path) -> str:
    """The pipeline class a diffusers folder names (``model_index.json``), or ''."""
    try:
        index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name if isinstance(name, str) else ""


def dtype_for(device: torch.device, pipeline_class_name: str = "") -> torch.dtype:
    """Half precision on CUDA (bfloat16 for the T5 families where the GPU has it); CPUs and
    MPS are safest in float32."""
    if device.type != "cuda":
        return torch.float32
    if pipeline_class_name.startswith(_T5_PIPELINES) and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
