"""What accelerators this machine has, as the UI's GPU set-up page shows it."""

from __future__ import annotations

import shutil
import subprocess

import psutil
import torch

from app.features.hardware.schemas import GPUInfo, HardwareStatus

_CUDA_HELP = "https://pytorch.org/get-started/locally/"


def _nvidia_driver_version() -> str:
    if shutil.which("nvidia-smi") is None:
        return "0"
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "0"
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if lines else "0"


def list_gpus() -> list[GPUInfo]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            GPUInfo(
                name=props.name,
                memory=int(props.total_memory),
                cuda_compute_capability=f"{props.major}.{props.minor}",
                is_primary=index == 0,
            )
        )
    return gpus


def total_ram() -> int:
    return int(psutil.virtual_memory().total)


def detect_hardware() -> HardwareStatus:
    gpus = list_gpus()
    driver = _nvidia_driver_version()
    mps = bool(torch.backends.mps.is_available())
    if gpus:
        status, message, steps = "ready", f"{len(gpus)} CUDA GPU(s) ready.", []
    elif driver != "0":
        status = "incompatible_cuda"
        message = "An NVIDIA driver is present but this PyTorch build cannot use CUDA."
        steps = ["Install a CUDA build of PyTorch (see the README).", "Restart the backend."]
    else:
        status, steps = "no_gpu", []
        message = "No CUDA GPU found; images are generated on the CPU" + (
            " (Apple MPS is available)." if mps else "."
        )
    return HardwareStatus(
        is_cuda=bool(gpus),
        cuda_runtime_version=str(torch.version.cuda or "0"),
        nvidia_driver_version=driver,
        gpus=gpus,
        message=message,
        overall_status=status,
        macos_mps_available=mps,
        recommendation_link=None if gpus else _CUDA_HELP,
        troubleshooting_steps=steps,
    )
