"""History entries: one per press of the generate button, with the images it produced."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import anyio.to_thread
from sqlalchemy.ext.asyncio import AsyncSession

from app.cores.model_manager.model_manager import ModelManager
from app.database import crud, hooks
from app.database.models import History
from app.exceptions import NoModelLoadedError, NotFoundError
from app.features.generators.schemas import GeneratorConfig
from app.platform.storage import Storage

logger = logging.getLogger(__name__)


async def create_history(
    session: AsyncSession, models: ModelManager, config: GeneratorConfig
) -> int:
    model_id = models.loaded_model_id
    if model_id is None:
        raise NoModelLoadedError()
    history = await crud.create_history(
        session, config.prompt, model_id, config.model_dump(mode="json")
    )
    return history.id


async def repair_on_startup(session: AsyncSession, storage: Storage) -> None:
    """Images are written before their rows commit: a crash in between leaves PNGs (or
    temporary files) that no history shows. They go at the next start, so that every image
    on disk is a recorded one."""
    recorded = await crud.image_file_names(session)
    removed = await anyio.to_thread.run_sync(storage.remove_unrecorded_images, recorded)
    if removed:
        logger.info("Removed %d image file(s) that no history records", len(removed))


async def list_histories(session: AsyncSession) -> Sequence[History]:
    return await crud.list_histories(session)


async def get_history(session: AsyncSession, history_id: int) -> History:
    history = await crud.get_history(session, history_id)
    if history is None:
        raise NotFoundError(f"History {history_id} not found")
    return history


async def delete_history(session: AsyncSession, storage: Storage, history_id: int) -> None:
    history = await get_history(session, history_id)
    paths = [image.path for image in history.generated_images]
    await crud.delete_history(session, history)
    for path in paths:
        hooks.after_commit(session, partial(storage.delete_generated_image, path))
