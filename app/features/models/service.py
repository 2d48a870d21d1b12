"""Models on this machine: the embedded default, registered at start-up, and loading them."""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import anyio.to_thread
from huggingface_hub import snapshot_download
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import EMBEDDED_MODEL_ID, Settings
from app.cores.model_manager.device import LoadTarget, resolve_device
from app.cores.model_manager.model_manager import ModelManager
from app.database import crud, hooks
from app.database.models import DownloadedModel
from app.exceptions import BadRequestError, ConflictError, NotFoundError
from app.features.config.service import read_user_config
from app.features.models.schemas import LoadModelResponse
from app.platform.storage import Storage

logger = logging.getLogger(__name__)


async def register_embedded_model(session: AsyncSession, storage: Storage) -> DownloadedModel:
    """List the embedded model (its folder is built at start-up, before this runs)."""
    return await crud.upsert_model(session, EMBEDDED_MODEL_ID, str(storage.embedded_model_dir))


async def list_downloaded(session: AsyncSession) -> Sequence[DownloadedModel]:
    return await crud.list_models(session)


def _hub_cache_folder(model_id: str) -> str | None:
    """A model already in the local Hugging Face cache; never goes to the network."""
    try:
        return str(snapshot_download(repo_id=model_id, local_files_only=True))
    except Exception:  # any miss (not cached, bad id) means "not here"
        return None


async def _resolve_source(session: AsyncSession, model_id: str, found: list[str]) -> str:
    """The folder to load ``model_id`` from; a Hugging Face cache folder is also put in
    ``found``, to be listed once it has loaded."""
    row = await crud.get_model(session, model_id)
    if row is not None:
        if not (Path(row.model_dir) / "model_index.json").is_file():
            raise NotFoundError(
                f"The files of model {model_id} are missing from {row.model_dir}. "
                "Download it again or remove it."
            )
        return row.model_dir
    cached = await anyio.to_thread.run_sync(_hub_cache_folder, model_id)
    if cached is None:
        raise NotFoundError(f"Model {model_id} is not downloaded on this machine.")
    found.append(cached)
    return cached


async def load_model(
    session: AsyncSession,
    models: ModelManager,
    storage: Storage,
    settings: Settings,
    model_id: str,
) -> LoadModelResponse | None:
    """Load a model; None means the load was cancelled or is already under way (204)."""

    def device_for_load() -> LoadTarget:
        user = read_user_config(storage)
        return LoadTarget(resolve_device(settings.device, user.device_index), user.gpu_scale_factor)

    from_hub_cache: list[str] = []
    loaded = await models.load(
        model_id, partial(_resolve_source, session, model_id, from_hub_cache), device_for_load
    )
    if loaded is None:
        return None
    if from_hub_cache:  # listed from now on; deleting it later removes the row, not the cache
        await crud.upsert_model(session, model_id, from_hub_cache[0])
    return LoadModelResponse(
        model_id=loaded.model_id,
        config=loaded.config,
        sample_size=loaded.sample_size,
        family=loaded.family.value,
        family_evidence=loaded.family_evidence,
    )


async def unload_model(models: ModelManager) -> None:
    await models.unload()


async def delete_model(
    session: AsyncSession, models: ModelManager, storage: Storage, model_id: str
) -> None:
    if model_id in (models.loaded_model_id, models.loading_model_id):
        raise ConflictError(f"Model {model_id} is loaded; unload it before deleting it.")
    row = await crud.get_model(session, model_id)
    if row is None:
        raise BadRequestError(f"Model {model_id} is not downloaded.")
    await crud.delete_model(session, row)
    folder = Path(row.model_dir)
    # Only folders this backend owns are removed; a shared hub cache is left alone.
    if not await anyio.to_thread.run_sync(_is_owned_folder, folder, storage.models_dir):
        return
    # Set aside now (an instant rename), removed for good only once the row is gone: a
    # failed commit puts it back, and a crash leaves a ``.trash-`` folder that the next
    # start removes.
    trash = folder.with_name(f"{TRASH_PREFIX}{uuid.uuid4().hex}")
    await anyio.to_thread.run_sync(folder.rename, trash)
    hooks.after_rollback(session, partial(_move, trash, folder))
    hooks.after_commit(session, partial(_remove_in_background, trash))


TRASH_PREFIX = ".trash-"


def _is_owned_folder(folder: Path, models_dir: Path) -> bool:
    return folder.is_dir() and folder.resolve().is_relative_to(models_dir.resolve())


def _move(source: Path, target: Path) -> None:
    source.rename(target)


def _remove_in_background(folder: Path) -> None:
    # A model folder can hold gigabytes: never delete it on the event loop.
    threading.Thread(
        target=shutil.rmtree, args=(folder,), kwargs={"ignore_errors": True}, daemon=True
    ).start()


def remove_trash(models_dir: Path) -> None:
    """Remove model folders whose deletion a crash interrupted (run at start-up)."""
    for entry in models_dir.glob(f"{TRASH_PREFIX}*"):
        shutil.rmtree(entry, ignore_errors=True)
