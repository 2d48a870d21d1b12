"""The UI's settings: device, memory shares and the safety check, kept across restarts."""

from __future__ import annotations

import torch

from app.cores.model_manager.model_manager import ModelManager
from app.exceptions import BadRequestError
from app.features.config.schemas import CPU_DEVICE, NEVER_CONFIGURED, BackendConfig, UserConfig
from app.features.config.upscalers import upscaler_sections
from app.features.hardware.service import list_gpus, total_ram
from app.platform.storage import Storage


def read_user_config(storage: Storage) -> UserConfig:
    raw = storage.read_json(storage.user_config_file)
    try:
        return UserConfig.model_validate(raw)
    except ValueError:
        return UserConfig()  # a hand-edited, broken file must not stop the backend


def _write(storage: Storage, config: UserConfig) -> BackendConfig:
    storage.write_json(storage.user_config_file, config.model_dump())
    return backend_config(storage)


def _total_gpu_memory(device_index: int) -> int:
    gpus = list_gpus()
    if gpus:
        return gpus[device_index if 0 <= device_index < len(gpus) else 0].memory
    if torch.backends.mps.is_available():
        return int(total_ram() * 0.8)  # MPS shares system memory
    return 0


def reported_device_index(stored: int, gpu_count: int) -> int:
    """The ``device_index`` the UI sees. ``-2`` (never chosen) sends the UI to its GPU page,
    which lists the CUDA GPUs: with none to list the page is a dead end, so a machine without
    one reports ``-1`` (CPU) and the UI goes to the editor. Nothing is stored: the automatic
    device choice still applies, and a GPU installed later brings the GPU page back."""
    if stored == NEVER_CONFIGURED and gpu_count == 0:
        return CPU_DEVICE
    return stored


def backend_config(storage: Storage) -> BackendConfig:
    config = read_user_config(storage)
    device_index = reported_device_index(config.device_index, len(list_gpus()))
    return BackendConfig(
        **config.model_copy(update={"device_index": device_index}).model_dump(),
        upscalers=upscaler_sections(),
        total_gpu_memory=_total_gpu_memory(config.device_index),
        total_ram_memory=total_ram(),
    )


def set_device(storage: Storage, device_index: int) -> BackendConfig:
    gpu_count = len(list_gpus())
    if device_index >= gpu_count:
        available = f"GPUs 0-{gpu_count - 1} or -1 (CPU)" if gpu_count else "-1 (CPU) only"
        raise BadRequestError(f"No GPU with index {device_index}; this machine offers {available}.")
    config = read_user_config(storage).model_copy(update={"device_index": device_index})
    return _write(storage, config)


def set_max_memory(storage: Storage, gpu_scale: float, ram_scale: float) -> BackendConfig:
    config = read_user_config(storage).model_copy(
        update={"gpu_scale_factor": gpu_scale, "ram_scale_factor": ram_scale}
    )
    return _write(storage, config)


def set_safety_check(storage: Storage, models: ModelManager, enabled: bool) -> BackendConfig:
    config = read_user_config(storage).model_copy(update={"safety_check_enabled": enabled})
    models.safety_check_enabled = enabled
    return _write(storage, config)
