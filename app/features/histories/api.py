from __future__ import annotations

from fastapi import APIRouter

from app.deps import ModelManagerDep, SessionDep, StorageDep
from app.features.generators.schemas import GeneratorConfig
from app.features.histories import service
from app.features.histories.schemas import HistoryOut, MessageResponse
from app.http import StrictJSONRoute
from app.validation import DatabaseIdPath

router = APIRouter(prefix="/histories", tags=["histories"], route_class=StrictJSONRoute)


@router.post("")
async def create_history(
    config: GeneratorConfig, session: SessionDep, models: ModelManagerDep
) -> int:
    """Record a generation request; returns the new history id as a bare integer."""
    return await service.create_history(session, models, config)


@router.get("")
async def list_histories(session: SessionDep) -> list[HistoryOut]:
    """List every history entry with its images, oldest first."""
    return [HistoryOut.model_validate(h) for h in await service.list_histories(session)]


@router.delete("/{history_id}")
async def delete_history(
    history_id: DatabaseIdPath, session: SessionDep, storage: StorageDep
) -> MessageResponse:
    """Delete a history entry and its image files."""
    await service.delete_history(session, storage, history_id)
    return MessageResponse(message=f"History {history_id} deleted successfully")
