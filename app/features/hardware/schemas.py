from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

OverallStatus = Literal["ready", "no_gpu", "driver_issue", "incompatible_cuda", "unknown_error"]


class GPUInfo(BaseModel):
    name: str
    memory: int
    cuda_compute_capability: str
    is_primary: bool


class HardwareStatus(BaseModel):
    is_cuda: bool
    cuda_runtime_version: str
    nvidia_driver_version: str
    gpus: list[GPUInfo]
    message: str
    overall_status: OverallStatus
    macos_mps_available: bool
    recommendation_link: str | None = None
    troubleshooting_steps: list[str] = []
