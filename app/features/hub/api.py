"""Routes: ``/models/recommendations``, ``/models/search``, ``/models/details``, ``/downloads``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from app.deps import SettingsDep, StorageDep
from app.features.hub import recommendations
from app.features.hub.schemas import Recommendations
from app.http import StrictJSONRoute

router = APIRouter(tags=["hub"], route_class=StrictJSONRoute)

# --- recommendations -------------------------------------------------------------------


@router.get("/models/recommendations")
async def get_recommendations(storage: StorageDep, settings: SettingsDep) -> Recommendations:
    """Curated models in three sections, with the section and model that suit this machine's
    memory and the user's memory shares (the first-run page's carousel)."""
    return await run_in_threadpool(recommendations.machine_recommendations, storage, settings)


# --- search, details, downloads --------------------------------------------------------
