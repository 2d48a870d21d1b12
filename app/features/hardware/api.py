from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from app.features.hardware import service
from app.features.hardware.schemas import HardwareStatus
from app.http import StrictJSONRoute

router = APIRouter(prefix="/hardware", tags=["hardware"], route_class=StrictJSONRoute)


@router.get("")
async def get_hardware() -> HardwareStatus:
    """Report the GPUs, CUDA runtime and driver this machine offers."""
    return await run_in_threadpool(service.detect_hardware)
