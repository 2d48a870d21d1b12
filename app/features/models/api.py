from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Query, Response, status

from app.deps import EventsDep, HubDep, ModelManagerDep, SessionDep, SettingsDep, StorageDep
from app.features.models import imports, service
from app.features.models.schemas import (
    DownloadedModelInfo,
    ImportModelRequest,
    ImportModelResponse,
    LoadModelRequest,
    LoadModelResponse,
    MessageResponse,
)
from app.http import StrictJSONRoute
from app.validation import ModelId

router = APIRouter(prefix="/models", tags=["models"], route_class=StrictJSONRoute)


@router.get("/downloaded")
async def list_downloaded(session: SessionDep) -> list[DownloadedModelInfo]:
    """List the models available on this machine, oldest first."""
    return await service.list_downloaded(session)


@router.post("/import")
async def import_model(
    body: ImportModelRequest, session: SessionDep, storage: StorageDep, events: EventsDep
) -> ImportModelResponse:
    """Add the user's own diffusers folder or single-file .safetensors checkpoint, in place
    (the file is only ever read) or copied (``copy``; ``download_step_progress`` events).
    400: not an importable model (says what it is); 409: already imported (same content)."""
    request = imports.ImportRequest(body.path, body.name, body.config, body.copy_in)
    imported = await imports.import_model(session, storage, events, request)
    listed = await anyio.to_thread.run_sync(service.describe, imported.row)
    return ImportModelResponse(**listed.model_dump(), evidence=imported.evidence)


@router.post(
    "/load",
    response_model=LoadModelResponse,
    responses={204: {"description": "Cancelled by a later request, or already loading."}},
)
async def load_model(
    body: LoadModelRequest,
    session: SessionDep,
    models: ModelManagerDep,
    storage: StorageDep,
    settings: SettingsDep,
    hub: HubDep,
) -> LoadModelResponse | Response:
    """Load a model for generation; progress arrives as `model_load_*` socket events."""
    loaded = await service.load_model(session, models, storage, settings, body.model_id, hub)
    if loaded is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return loaded


@router.post("/unload")
async def unload_model(models: ModelManagerDep) -> MessageResponse:
    """Unload the model (after a running generation); cancels a load in progress."""
    await service.unload_model(models)
    return MessageResponse(message="Model unloaded successfully")


@router.delete("")
async def delete_model(
    model_id: Annotated[ModelId, Query()],
    session: SessionDep,
    models: ModelManagerDep,
    storage: StorageDep,
) -> MessageResponse:
    """Delete a downloaded model's files and record (409 while it is loaded); an import
    registered in place is only forgotten (the user's file stays), a copied one removed."""
    await service.delete_model(session, models, storage, model_id)
    return MessageResponse(message=f"Model {model_id} deleted successfully")
