from __future__ import annotations

from fastapi import APIRouter

from app.deps import EventsDep, ModelManagerDep, SessionDep, StorageDep
from app.features.generators import service
from app.features.generators.schemas import GenerateRequest, GenerateResponse, SamplerOut
from app.http import StrictJSONRoute

router = APIRouter(prefix="/generators", tags=["generators"], route_class=StrictJSONRoute)


@router.post("")
async def generate(
    body: GenerateRequest,
    session: SessionDep,
    models: ModelManagerDep,
    storage: StorageDep,
    events: EventsDep,
) -> GenerateResponse:
    """Generate images for a history entry; previews arrive as socket events meanwhile."""
    return await service.generate(session, models, storage, events, body)


@router.get("/samplers")
async def list_samplers() -> list[SamplerOut]:
    """List the samplers the `sampler` field accepts."""
    return [
        SamplerOut(name=s.name, value=s.value, description=s.description)
        for s in service.samplers()
    ]
