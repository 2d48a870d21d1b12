"""Application factory: FastAPI app, Socket.IO server, and the lifespan that owns shared state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import socketio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp

from app.config import Settings, get_settings
from app.cores.model_manager.embedded_model import build_embedded_model
from app.cores.model_manager.model_manager import ModelManager
from app.database.migrations import upgrade_to_head
from app.database.session import create_engine, create_session_factory
from app.exceptions import AppError
from app.features.config.api import router as config_router
from app.features.config.service import read_user_config
from app.features.generators.api import router as generators_router
from app.features.hardware.api import router as hardware_router
from app.features.health.api import router as health_router
from app.features.histories import service as histories_service
from app.features.histories.api import router as histories_router
from app.features.hub.api import router as hub_router
from app.features.hub.downloads import ModelDownloads, remove_unfinished
from app.features.hub.hub_client import HubClient
from app.features.loras import service as loras_service
from app.features.loras.api import router as loras_router
from app.features.loras.downloads.manager import DownloadManager
from app.features.models import service as models_service
from app.features.models.api import router as models_router
from app.features.styles.api import router as styles_router
from app.http import (
    ERROR_RESPONSES,
    TrailingSlashMiddleware,
    UnexpectedErrorMiddleware,
    app_error_handler,
)
from app.logging_setup import configure_logging
from app.platform.events import EventEmitter
from app.platform.storage import GENERATED_IMAGES_URL_PREFIX, Storage
from app.security import AccessPolicy, LocalAccessGuard

logger = logging.getLogger(__name__)

SOCKET_MAX_MESSAGE_BYTES = 64 * 1024
"""The largest Socket.IO message a client may send (the UI sends none; events go out)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    storage: Storage = app.state.storage
    storage.ensure_dirs()
    database_url = settings.resolved_database_url
    await anyio.to_thread.run_sync(upgrade_to_head, database_url)
    engine = create_engine(database_url)
    session_factory = create_session_factory(engine)
    async with session_factory() as session:
        await anyio.to_thread.run_sync(models_service.remove_trash, storage.models_dir)
        await anyio.to_thread.run_sync(remove_unfinished, storage.models_dir)
        await anyio.to_thread.run_sync(build_embedded_model, storage.embedded_model_dir)
        await models_service.register_embedded_model(session, storage)
        await loras_service.repair_on_startup(session, storage)
        await histories_service.repair_on_startup(session, storage)
        await session.commit()
    events: EventEmitter = app.state.events
    await events.start()
    models = ModelManager(events, settings.lora_cache_max_count, settings.lora_cache_max_bytes)
    models.safety_check_enabled = read_user_config(storage).safety_check_enabled
    downloads = DownloadManager(
        settings, storage, session_factory, events, loaded_family=lambda: models.loaded_family
    )
    hub = HubClient(settings)
    model_downloads = ModelDownloads(settings, storage, session_factory, events, hub)
    app.state.session_factory = session_factory
    app.state.model_manager = models
    app.state.lora_downloads = downloads
    app.state.hub = hub
    app.state.model_downloads = model_downloads
    logger.info("Backend ready; cache folder %s", settings.cache_dir.resolve())
    logger.info(app.state.access_policy.describe())
    try:
        yield
    finally:
        await downloads.aclose()  # cancels running downloads, removes their temporary files
        await model_downloads.aclose()
        await hub.aclose()
        await anyio.to_thread.run_sync(models.shutdown)
        await events.stop()
        await engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app (HTTP only). ``create_asgi_app`` adds Socket.IO in front of it."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="LocalAI backend",
        summary="Local image generation with first-class LoRA support.",
        lifespan=lifespan,
        redirect_slashes=False,
        responses=ERROR_RESPONSES,
    )
    # The UI speaks the websocket transport only (CONTRACT §5). Long-polling is not served:
    # an oversized polling POST was never answered and held its connection (and a shutdown)
    # forever. Clients send nothing large, so messages are bounded too. The access guard in
    # front refuses other origins already; Socket.IO applies the same policy itself too.
    policy = AccessPolicy.from_settings(settings)
    sio = socketio.AsyncServer(
        async_mode="asgi",
        cors_allowed_origins=policy.socket_handshake_allowed,
        transports=["websocket"],
        max_http_buffer_size=SOCKET_MAX_MESSAGE_BYTES,
    )
    storage = Storage(settings)
    storage.ensure_dirs()
    app.state.settings = settings
    app.state.access_policy = policy
    app.state.storage = storage
    app.state.sio = sio
    app.state.events = EventEmitter(sio)

    app.add_exception_handler(AppError, app_error_handler)
    # Middleware added first runs innermost: errors become 500s inside CORS.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(
        CORSMiddleware,
        # Every origin that reaches this far passed the access guard's allowlist (see
        # ``serve``): it gets CORS with credentials, as the UI expects.
        allow_origin_regex=".*",
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    app.add_middleware(TrailingSlashMiddleware)
    for router in (
        health_router,
        config_router,
        hardware_router,
        models_router,
        hub_router,
        histories_router,
        generators_router,
        styles_router,
        loras_router,
    ):
        app.include_router(router)
    app.mount(
        f"/{GENERATED_IMAGES_URL_PREFIX}",
        StaticFiles(directory=storage.generated_images_dir),
        name="generated_images",
    )
    return app


def serve(app: FastAPI) -> ASGIApp:
    """What answers HTTP: the access guard (Origin and Host allowlists) in front of
    everything, then Socket.IO at ``/socket.io/``, then the FastAPI app."""
    routed = socketio.ASGIApp(app.state.sio, other_asgi_app=app)
    return LocalAccessGuard(routed, app.state.access_policy)


def create_asgi_app(settings: Settings | None = None) -> ASGIApp:
    """The served application (``uvicorn main:app``)."""
    return serve(create_app(settings))
