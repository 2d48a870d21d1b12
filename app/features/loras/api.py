from __future__ import annotations

from fastapi import APIRouter, Query, status

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
    body: LoRAUploadRequest,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    models: ModelManagerDep,
) -> LoRAInfo:
    """Add a LoRA: validate the .safetensors file at `file_path`, describe it (format, base
    model, trigger words, hashes) and copy it into the cache."""
    return await service.upload_lora(session, storage, settings, models, body.file_path)


@router.get("")
async def list_loras(
    session: SessionDep,
    models: ModelManagerDep,
    compatible_with_loaded: bool | None = Query(
        default=None,
        description="true: leave out LoRAs known to be made for another model family than "
        "the loaded model (unknown ones stay); false: only those.",
    ),
) -> LoRAListResponse:
    """List every added LoRA, oldest first."""
    return LoRAListResponse(loras=await service.list_loras(session, models, compatible_with_loaded))


@router.get("/{lora_id}")
async def get_lora(lora_id: int, session: SessionDep, models: ModelManagerDep) -> LoRAInfo:
    """Show one LoRA."""
    return await service.get_lora(session, models, lora_id)


@router.delete("/{lora_id}")
async def delete_lora(
    lora_id: int, session: SessionDep, models: ModelManagerDep
) -> LoRADeleteResponse:
    """Delete a LoRA's record and its stored file."""
    await service.delete_lora(session, models, lora_id)
    return LoRADeleteResponse(id=lora_id, message=f"LoRA {lora_id} deleted successfully")
