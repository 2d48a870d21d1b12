"""Which torch device and dtype to run on: cuda > mps > cpu, unless told otherwise."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(setting: str, device_index: int) -> torch.device:
    """The device to load on.

    ``setting`` is the operator's ``LOCALAI_DEVICE`` (``auto`` defers to the UI's choice);
    ``device_index`` is the UI's choice: -2 never chosen, -1 CPU, N for CUDA device N.
    A GPU choice that this machine cannot honour falls back to the automatic choice.
    """
    if setting != "auto":
        return torch.device(setting)
    if device_index == -1:
        return torch.device("cpu")
    if 0 <= device_index < (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        return torch.device("cuda", device_index)
    return auto_device()


@dataclass(frozen=True)
class LoadTarget:
    """Where to load a model: the device, and the share of its memory the user allows
    (``gpu_scale_factor``; a model that does not fit it is offloaded, see ``placement``)."""

    device: torch.device
    gpu_share: float = 1.0
