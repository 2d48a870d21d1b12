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
from app.cores.model_manager.pipeline_manager import ModelSource
from app.database import crud, hooks
from app.database.models import DownloadedModel
from app.exceptions import BadRequestError, ConflictError, NotFoundError
from app.features.config.service import read_user_config
from app.features.hub.hub_client import HubClient
from app.features.models import import_files, imports, single_file_configs
from app.features.models.schemas import DownloadedModelInfo, LoadModelResponse
from app.platform.storage import Storage

logger = logging.getLogger(__name__)


async def register_embedded_model(session: AsyncSession, storage: Storage) -> DownloadedModel:
    """List the embedded model (its folder is built at start-up, before this runs)."""
    return await crud.upsert_model(
        session, EMBEDDED_MODEL_ID, str(storage.embedded_model_dir), "embedded"
    )


async def list_downloaded(session: AsyncSession) -> list[DownloadedModelInfo]:
    rows = await crud.list_models(session)
    return await anyio.to_thread.run_sync(_describe_all, rows)


def _describe_all(rows: Sequence[DownloadedModel]) -> list[DownloadedModelInfo]:
    return [describe(row) for row in rows]


def describe(row: DownloadedModel) -> DownloadedModelInfo:
    """A row as ``GET /models/downloaded`` lists it (blocking: looks at the disk)."""
    family, variant = imports.folder_family(row)
    return DownloadedModelInfo(
        id=row.id,
        model_id=row.model_id,
        model_dir=row.model_dir,
        created_at=row.created_at,
        updated_at=row.updated_at,
        source=row.source,
        family=family,
        variant=variant,
        size=row.size,
        missing=imports.is_missing(row),
    )


def _hub_cache_folder(model_id: str) -> str | None:
    """A model already in the local Hugging Face cache; never goes to the network."""
    try:
        return str(snapshot_download(repo_id=model_id, local_files_only=True))
    except Exception:  # any miss (not cached, bad id) means "not here"
        return None


async def _resolve_source(
    session: AsyncSession,
    storage: Storage,
    hub: HubClient | None,
    model_id: str,
    found: list[str],
) -> ModelSource:
    """The folder (or single file and configs) to load ``model_id`` from; a Hugging Face
    cache folder is also put in ``found``, to be listed once it has loaded."""
    row = await crud.get_model(session, model_id)
    if row is not None and single_file_configs.is_single_file(row):
        return await single_file_configs.single_file_source(session, storage, hub, row)
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
    hub: HubClient | None = None,
) -> LoadModelResponse | None:
    """Load a model; None means the load was cancelled or is already under way (204)."""

    def device_for_load() -> LoadTarget:
        user = read_user_config(storage)
        return LoadTarget(resolve_device(settings.device, user.device_index), user.gpu_scale_factor)

    from_hub_cache: list[str] = []
    loaded = await models.load(
        model_id,
        partial(_resolve_source, session, storage, hub, model_id, from_hub_cache),
        device_for_load,
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
    # Only what this backend owns is removed (its downloads and copied imports); a shared
    # hub cache and a file imported in place are left alone.
    if not await anyio.to_thread.run_sync(_is_owned, folder, storage.models_dir):
        return
    # Set aside now (an instant rename), removed for good only once the row is gone: a
    # failed commit puts it back, and a crash leaves a ``.trash-`` folder that the next
    # start removes.
    trash = folder.with_name(f"{TRASH_PREFIX}{uuid.uuid4().hex}")
    await anyio.to_thread.run_sync(folder.rename, trash)
    hooks.after_rollback(session, partial(_move, trash, folder))
    hooks.after_commit(session, partial(_remove_in_background, trash))


TRASH_PREFIX = ".trash-"


def _is_owned(path: Path, models_dir: Path) -> bool:
    if not (path.is_dir() or path.is_file()) or path.is_symlink():
        return False
    resolved, root = path.resolve(), models_dir.resolve()
    return resolved != root and resolved.is_relative_to(root)


def _move(source: Path, target: Path) -> None:
    source.rename(target)


def _remove_in_background(folder: Path) -> None:
    # A model folder can hold gigabytes: never delete it on the event loop.
    threading.Thread(target=_remove, args=(folder,), daemon=True).start()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_trash(models_dir: Path) -> None:
    """Remove model folders and copied files whose deletion a crash interrupted, and copies
    of imports a crash interrupted (run at start-up)."""
    for prefix in (TRASH_PREFIX, import_files.IMPORT_PREFIX):
        for entry in models_dir.glob(f"{prefix}*"):
            _remove(entry)
