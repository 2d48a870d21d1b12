from __future__ import annotations

from fastapi import APIRouter, status

from app.deps import ModelManagerDep, SessionDep, SettingsDep, StorageDep
from app.features.loras import service
from app.features.loras.schemas import (
    LoRADeleteResponse,
    LoRAInfo,
    LoRAListResponse,
    LoRAUploadRequest,
)

router = APIRouter(prefix="/loras", tags=["loras"])


@router.post("/upload", status_code=status.HTTP_201_CREATED)
async def upload_lora(
    body: LoRAUploadRequest, session: SessionDep, storage: StorageDep, settings: SettingsDep
) -> LoRAInfo:
    """Add a LoRA: validate the .safetensors file at `file_path` and copy it into the cache."""
    return await service.upload_lora(session, storage, settings, body.file_path)


@router.get("")
async def list_loras(session: SessionDep) -> LoRAListResponse:
    """List every added LoRA, oldest first."""
    return LoRAListResponse(loras=await service.list_loras(session))


@router.get("/{lora_id}")
async def get_lora(lora_id: int, session: SessionDep) -> LoRAInfo:
    """Show one LoRA."""
    return await service.get_lora(session, lora_id)


@router.delete("/{lora_id}")
async def delete_lora(
    lora_id: int, session: SessionDep, models: ModelManagerDep
) -> LoRADeleteResponse:
    """Delete a LoRA's record and its stored file."""
    await service.delete_lora(session, models, lora_id)
    return LoRADeleteResponse(id=lora_id, message=f"LoRA {lora_id} deleted successfully")
