from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.deps import ModelManagerDep, SessionDep, SettingsDep, StorageDep
from app.features.models import service
from app.features.models.schemas import (
    DownloadedModelInfo,
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
    rows = await service.list_downloaded(session)
    return [DownloadedModelInfo.model_validate(row) for row in rows]


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
) -> LoadModelResponse | Response:
    """Load a model for generation; progress arrives as `model_load_*` socket events."""
    loaded = await service.load_model(session, models, storage, settings, body.model_id)
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
    """Delete a downloaded model's files and record (409 while it is loaded)."""
    await service.delete_model(session, models, storage, model_id)
    return MessageResponse(message=f"Model {model_id} deleted successfully")
