"""The user's own model files: a diffusers folder or a single-file ``.safetensors`` checkpoint
imported from disk (``POST /models/import``), and what loading one needs.

An import is registered IN PLACE by default: the row records the path, and the user's file is
only ever opened for reading (never moved, modified or locked); a file that has gone shows as
missing and loading it is a 404. ``copy`` copies it into ``<cache>/models`` instead (temporary
name, fsync, rename; removed on failure), with ``download_step_progress`` events.

Duplicates are found by content: the sha256 of the file (of a folder: of its denoiser weights,
file by file), read in chunks and remembered in ``file_hashes`` by (path, size, mtime), so a
7 GB file is read once. The same sha256 gives the infotext's ``Model hash`` (A1111's: its first
10 hex digits).

A single file's configs (component configs, scheduler, tokenizers) come from, in order: the
import's ``config`` (a local diffusers folder or a Hub repo id), a diffusers model of the same
family and variant already on this machine, or the family's reference repository on the Hub
(config files only, fetched once into ``<cache>/models/.configs/<repo>``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from sqlalchemy.ext.asyncio import AsyncSession

from app.cores.model_manager.checkpoint_files import (
    CheckpointInfo,
)
from app.cores.model_manager.single_file import (
    ConfigFolderError,
    check_config_folder,
    config_folder_family,
)
from app.database import crud, hooks
from app.database.models import DownloadedModel
from app.exceptions import ConflictError
from app.features.models.import_files import (
    CHECKPOINT_EXTENSION,
    CopyProgress,
    ImportRefused,
    check_path,
    content_sha256,
    copy_in,
    copy_target,
    remove_path,
)
from app.platform.events import EventEmitter
from app.platform.storage import Storage
from app.validation import control_character_in

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportRequest:
    path: str
    name: str | None = None
    config: str | None = None
    copy: bool = False


@dataclass(frozen=True)
class Imported:
    row: DownloadedModel
    evidence: str


# ---------------------------------------------------------------------------------------------
# The import


def _default_name(path: Path, is_folder: bool) -> str:
    return path.name if is_folder else path.stem


async def import_model(
    session: AsyncSession, storage: Storage, events: EventEmitter, request: ImportRequest
) -> Imported:
    checked = await anyio.to_thread.run_sync(check_path, request.path)
    model_id = request.name or _default_name(checked.path, checked.is_folder)
    if not model_id.strip() or control_character_in(model_id) is not None:
        raise ImportRefused(f"'{model_id}' cannot name a model: give a name.")
    if await crud.get_model(session, model_id) is not None:
        raise ConflictError(
            f"A model named '{model_id}' is already on this machine: choose another name."
        )
    if request.config is not None and not checked.is_folder and checked.info is not None:
        await anyio.to_thread.run_sync(_check_given_config, request.config, checked.info)
    try:
        sha256 = await content_sha256(session, checked)
    except OSError as error:
        raise ImportRefused(f"Cannot read '{checked.path}': {error.strerror or error}.") from None
    existing = await crud.get_model_by_sha256(session, sha256)
    if existing is not None:
        raise ConflictError(
            f"'{checked.path.name}' is already imported as model '{existing.model_id}' "
            f"(same content, sha256 {sha256[:10]})."
        )
    model_dir = checked.path.resolve()
    if request.copy:
        final = copy_target(storage, model_id, checked.is_folder)
        progress = CopyProgress(events, model_id, checked.path.name, checked.size)
        await anyio.to_thread.run_sync(copy_in, checked, final, progress, sha256)
        hooks.after_rollback(session, lambda: remove_path(final))
        model_dir = final
        if not checked.is_folder:
            info = await anyio.to_thread.run_sync(final.stat)
            key = str(final.resolve())
            await crud.remember_file_hash(session, key, info.st_size, info.st_mtime_ns, sha256)
    row = await crud.create_imported_model(
        session,
        model_id=model_id,
        model_dir=str(model_dir),
        family=checked.family.value,
        variant=checked.variant,
        size=checked.size,
        sha256=sha256,
        config=request.config,
    )
    if row is None:
        raise ConflictError(f"A model named '{model_id}' was added meanwhile: choose another name.")
    logger.info("Imported %s from %s (%s)", model_id, checked.path, checked.evidence)
    return Imported(row, checked.evidence)


def _check_given_config(config: str, info: CheckpointInfo) -> None:
    folder = Path(config).expanduser()
    if folder.is_dir():
        try:
            check_config_folder(info, folder)
        except ConfigFolderError as error:
            raise ImportRefused(str(error)) from None


# ---------------------------------------------------------------------------------------------
# Listing


def is_missing(row: DownloadedModel) -> bool:
    path = Path(row.model_dir)
    if path.suffix == CHECKPOINT_EXTENSION and not path.is_dir():
        return not path.is_file()
    return not (path / "model_index.json").is_file()


def folder_family(row: DownloadedModel) -> tuple[str | None, str | None]:
    """The family of a row that does not record one, from its folder's configs."""
    if row.family is not None:
        return row.family, row.variant
    try:
        family, variant = config_folder_family(Path(row.model_dir))
    except ConfigFolderError:
        return None, None
    return family.value, variant
