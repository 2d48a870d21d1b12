"""Routes: ``/models/recommendations``, ``/models/search``, ``/models/details``, ``/downloads``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool

from app.deps import HubDep, ModelDownloadsDep, SessionDep, SettingsDep, StorageDep
from app.features.hub import recommendations, service
from app.features.hub.schemas import (
    DownloadCancelResponse,
    DownloadRequest,
    DownloadResponse,
    ModelDetails,
    ModelSearchResponse,
    Recommendations,
    SearchSort,
)
from app.http import StrictJSONRoute, error_response
from app.validation import HubRepoId

router = APIRouter(tags=["hub"], route_class=StrictJSONRoute)

# --- recommendations -------------------------------------------------------------------


@router.get("/models/recommendations")
async def get_recommendations(storage: StorageDep, settings: SettingsDep) -> Recommendations:
    """Curated models in three sections, with the section and model that suit this machine's
    memory and the user's memory shares (the first-run page's carousel)."""
    return await run_in_threadpool(recommendations.machine_recommendations, storage, settings)


# --- search, details, downloads --------------------------------------------------------


@router.get("/models/search")
async def search_models(
    session: SessionDep,
    hub: HubDep,
    model_name: Annotated[str | None, Query(max_length=200)] = None,
    filter: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    sort: SearchSort = "likes",
) -> ModelSearchResponse:
    """Text-to-image diffusers models on the Hugging Face Hub (needs the internet)."""
    found = await service.search(session, hub, model_name, filter, sort, limit)
    return ModelSearchResponse(models_search_info=found)


@router.get("/models/details")
async def model_details(
    session: SessionDep, hub: HubDep, model_id: Annotated[HubRepoId, Query()]
) -> ModelDetails:
    """The Hub's model info (files with sizes in `siblings`), and whether it is here."""
    return await service.details(session, hub, model_id, None)


@router.post(
    "/downloads",
    responses={
        401: error_response("The repository is gated or private: a token is needed."),
        404: error_response("No such repository on the Hub."),
        409: error_response("The download was cancelled."),
        502: error_response("The Hub failed or could not be reached."),
        507: error_response("Not enough disk space (the sizes are in `detail`)."),
    },
)
async def download_model(body: DownloadRequest, downloads: ModelDownloadsDep) -> DownloadResponse:
    """Download a diffusers pipeline from the Hub; answers when it is complete. Progress
    arrives as `download_*` socket events; a second request for the same model joins."""
    done = await service.download(downloads, body.model_id, body.hf_token)
    return DownloadResponse(model_id=done.model_id, path=str(done.path), message=done.message)


@router.delete("/downloads/{model_id:path}")
async def cancel_download(
    model_id: Annotated[HubRepoId, Path()], downloads: ModelDownloadsDep
) -> DownloadCancelResponse:
    """Cancel a running download; its files are removed."""
    await service.cancel_download(downloads, model_id)
    return DownloadCancelResponse(message=f"Download of {model_id} cancelled.")
