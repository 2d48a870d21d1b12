"""The LoRA endpoints: the service works on rows, the responses are made here
(``LoRAInfo.of``, with the family of the model loaded now)."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Query, status

from app.deps import LoRADownloadsDep, ModelManagerDep, SessionDep, SettingsDep, StorageDep
from app.features.loras import service
from app.features.loras.downloads.schemas import (
    LoRADownloadCancelResponse,
    LoRADownloadInfo,
    LoRADownloadListResponse,
    LoRADownloadRequest,
)
from app.features.loras.schemas import (
    LoRADeleteResponse,
    LoRAInfo,
    LoRAListResponse,
    LoRAUploadRequest,
)
from app.http import StrictJSONRoute
from app.validation import DatabaseIdPath

router = APIRouter(prefix="/loras", tags=["loras"], route_class=StrictJSONRoute)


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
    row = await service.upload_lora(session, storage, settings, body.file_path)
    return LoRAInfo.of(row, models.loaded_family)


@router.post("/download", status_code=status.HTTP_202_ACCEPTED)
async def download_lora(
    body: LoRADownloadRequest, session: SessionDep, downloads: LoRADownloadsDep
) -> LoRADownloadInfo:
    """Add a LoRA from Hugging Face, CivitAI or a URL. Answers at once with the download
    (state ``queued``, or ``failed`` when CivitAI could not describe the version); progress
    arrives as ``lora_download_*`` events and at ``GET /loras/downloads/{id}``. 409 when
    CivitAI's SHA256 names a LoRA already added."""
    return (await downloads.start(body, session)).info()


@router.get("/downloads")
async def list_lora_downloads(downloads: LoRADownloadsDep) -> LoRADownloadListResponse:
    """Running, queued and recently finished downloads, newest first."""
    return LoRADownloadListResponse(downloads=[d.info() for d in downloads.recent()])


@router.get("/downloads/{download_id}")
async def get_lora_download(download_id: str, downloads: LoRADownloadsDep) -> LoRADownloadInfo:
    """One download: its state, bytes so far, the LoRA once completed, why it failed."""
    return downloads.get(download_id).info()


@router.delete("/downloads/{download_id}")
async def cancel_lora_download(
    download_id: str, downloads: LoRADownloadsDep
) -> LoRADownloadCancelResponse:
    """Cancel a queued or running download; nothing of it is kept. 409 once it finished."""
    await downloads.cancel(download_id)
    return LoRADownloadCancelResponse(
        id=download_id, message=f"LoRA download {download_id} cancelled"
    )


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
    family = models.loaded_family
    rows = await service.list_loras(session, family, compatible_with_loaded)
    # LoRAInfo.of looks for each file on disk: off the event loop.
    infos = await anyio.to_thread.run_sync(lambda: [LoRAInfo.of(row, family) for row in rows])
    return LoRAListResponse(loras=infos)


@router.get("/{lora_id}")
async def get_lora(
    lora_id: DatabaseIdPath, session: SessionDep, models: ModelManagerDep
) -> LoRAInfo:
    """Show one LoRA."""
    return LoRAInfo.of(await service.get_lora(session, lora_id), models.loaded_family)


@router.delete("/{lora_id}")
async def delete_lora(
    lora_id: DatabaseIdPath, session: SessionDep, models: ModelManagerDep
) -> LoRADeleteResponse:
    """Delete a LoRA's record and its stored file."""
    await service.delete_lora(session, lora_id, forget=models.forget_lora)
    return LoRADeleteResponse(id=lora_id, message=f"LoRA {lora_id} deleted successfully")
