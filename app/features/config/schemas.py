from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

NEVER_CONFIGURED = -2
CPU_DEVICE = -1


class UpscalerOption(BaseModel):
    value: str
    name: str
    description: str
    suggested_denoise_strength: float
    method: Literal["traditional", "ai"]
    is_recommended: bool


class UpscalerSection(BaseModel):
    method: Literal["traditional", "ai"]
    title: str
    options: list[UpscalerOption]


class UserConfig(BaseModel):
    """The choices the UI makes, kept in ``<cache>/user_config.json``."""

    device_index: int = NEVER_CONFIGURED
    safety_check_enabled: bool = True
    gpu_scale_factor: float = Field(default=0.5, ge=0.1, le=1.0)
    ram_scale_factor: float = Field(default=0.5, ge=0.1, le=1.0)


class BackendConfig(UserConfig):
    upscalers: list[UpscalerSection]
    total_gpu_memory: int
    total_ram_memory: int


class DeviceRequest(BaseModel):
    # The CPU-only screen may send no index: that can only mean the CPU.
    device_index: int = Field(default=CPU_DEVICE, ge=CPU_DEVICE)


class MaxMemoryRequest(BaseModel):
    gpu_scale_factor: float = Field(ge=0.1, le=1.0)
    ram_scale_factor: float = Field(ge=0.1, le=1.0)


class SafetyCheckRequest(BaseModel):
    enabled: bool
