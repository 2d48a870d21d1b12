from __future__ import annotations

from fastapi import APIRouter

from app.deps import ModelManagerDep, StorageDep
from app.features.config import service
from app.features.config.schemas import (
    BackendConfig,
    DeviceRequest,
    MaxMemoryRequest,
    SafetyCheckRequest,
)
from app.http import StrictJSONRoute

router = APIRouter(prefix="/config", tags=["config"], route_class=StrictJSONRoute)


@router.get("")
async def get_config(storage: StorageDep) -> BackendConfig:
    """Return the backend settings; `device_index` -2 means first-run set-up is needed."""
    return service.backend_config(storage)


@router.put("/device")
async def set_device(body: DeviceRequest, storage: StorageDep) -> BackendConfig:
    """Choose the device: -1 for the CPU, N for CUDA GPU N (used from the next model load)."""
    return service.set_device(storage, body.device_index)


@router.put("/max-memory")
async def set_max_memory(body: MaxMemoryRequest, storage: StorageDep) -> BackendConfig:
    """Set the shares of GPU and system memory the backend may use (0.1-1.0)."""
    return service.set_max_memory(storage, body.gpu_scale_factor, body.ram_scale_factor)


@router.put("/safety-check")
async def set_safety_check(
    body: SafetyCheckRequest, storage: StorageDep, models: ModelManagerDep
) -> BackendConfig:
    """Turn the NSFW safety check on or off."""
    return service.set_safety_check(storage, models, body.enabled)
