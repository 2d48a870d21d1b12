"""Dependency aliases for routes: ``SessionDep``, ``ModelManagerDep`` and friends.

Shared state is created in the app's lifespan and kept on ``app.state``; these aliases hand it
to routes. ``SessionDep`` opens one session per request and commits it once, after the route
returns and before the response is sent, or rolls it back if anything raised; then it runs
the file work registered in ``app.database.hooks``. The dependencies are ``async`` so that
they run on the event loop in arrival order instead of hopping through the thread pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.cores.model_manager.model_manager import ModelManager
from app.database import hooks
from app.features.hub.downloads import ModelDownloads
from app.features.hub.hub_client import HubClient
from app.features.loras.downloads.manager import DownloadManager
from app.platform.events import EventEmitter
from app.platform.storage import Storage


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with hooks.transaction(request.app.state.session_factory) as session:
        yield session


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_model_manager(request: Request) -> ModelManager:
    manager: ModelManager = request.app.state.model_manager
    return manager


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


async def get_events(request: Request) -> EventEmitter:
    events: EventEmitter = request.app.state.events
    return events


async def get_lora_downloads(request: Request) -> DownloadManager:
    downloads: DownloadManager = request.app.state.lora_downloads
    return downloads


async def get_hub(request: Request) -> HubClient:
    hub: HubClient = request.app.state.hub
    return hub


async def get_model_downloads(request: Request) -> ModelDownloads:
    downloads: ModelDownloads = request.app.state.model_downloads
    return downloads


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelManagerDep = Annotated[ModelManager, Depends(get_model_manager)]
StorageDep = Annotated[Storage, Depends(get_storage)]
EventsDep = Annotated[EventEmitter, Depends(get_events)]
LoRADownloadsDep = Annotated[DownloadManager, Depends(get_lora_downloads)]
HubDep = Annotated[HubClient, Depends(get_hub)]
ModelDownloadsDep = Annotated[ModelDownloads, Depends(get_model_downloads)]
