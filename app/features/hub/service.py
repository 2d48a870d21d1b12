"""What the hub routes do: search and details from the Hub, marked with what is on this
machine; downloads through :class:`ModelDownloads`."""

from __future__ import annotations

from huggingface_hub import ModelInfo
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import crud
from app.features.hub.downloads import DownloadedRepo, ModelDownloads
from app.features.hub.hub_client import HubClient
from app.features.hub.schemas import ModelDetails, ModelSearchEntry, SearchSort


async def _downloaded_ids(session: AsyncSession) -> set[str]:
    return {row.model_id for row in await crud.list_models(session)}


async def search(
    session: AsyncSession,
    hub: HubClient,
    text: str | None,
    tag: str | None,
    sort: SearchSort,
    limit: int,
) -> list[ModelSearchEntry]:
    found = await hub.search(text, tag, sort, limit)
    here = await _downloaded_ids(session)
    return [_search_entry(info, info.id in here) for info in found]


def _search_entry(info: ModelInfo, is_downloaded: bool) -> ModelSearchEntry:
    return ModelSearchEntry(
        id=info.id,
        author=info.author or info.id.split("/", 1)[0],
        likes=info.likes,
        trending_score=info.trending_score,
        downloads=info.downloads or 0,
        tags=list(info.tags or []),
        is_downloaded=is_downloaded,
        size_mb=None,  # the search API gives no pipeline size (details' siblings do)
    )


async def details(
    session: AsyncSession, hub: HubClient, model_id: str, hf_token: str | None
) -> ModelDetails:
    document = await hub.model_info_json(model_id, hub.token(hf_token))
    here = await _downloaded_ids(session)
    document.setdefault("author", model_id.split("/", 1)[0])
    return ModelDetails.model_validate({**document, "is_downloaded": model_id in here})


async def download(
    downloads: ModelDownloads, model_id: str, hf_token: str | None
) -> DownloadedRepo:
    return await downloads.download(model_id, hf_token)


async def cancel_download(downloads: ModelDownloads, model_id: str) -> None:
    await downloads.cancel(model_id)
