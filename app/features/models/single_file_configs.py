"""A single-file checkpoint's configs for loading (component configs, scheduler,
tokenizers), in order: the import's ``config`` (a local diffusers folder or a Hub repo id), a
diffusers model of the same family and variant already on this machine, or the family's
reference repository on the Hub (config files only, fetched once into
``<cache>/models/.configs/<repo>``); offline without any: a 424 naming what to fetch."""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import anyio.to_thread
from sqlalchemy.ext.asyncio import AsyncSession

from app.cores.lora_files.safetensors_file import SafetensorsError
from app.cores.model_manager.checkpoint_files import (
    CheckpointInfo,
    CheckpointRefused,
    inspect_checkpoint,
)
from app.cores.model_manager.model_family import ModelFamily
from app.cores.model_manager.pipeline_manager import SingleFileSource
from app.cores.model_manager.single_file import (
    CONFIG_SUFFIXES,
    ConfigFolderError,
    check_config_folder,
    config_folder_family,
)
from app.database import crud
from app.database.models import DownloadedModel
from app.exceptions import AppError, BadRequestError, NotFoundError
from app.features.hub.hub_client import HubClient, hub_error
from app.features.models.import_files import CHECKPOINT_EXTENSION, IMPORT_PREFIX, file_sha256
from app.platform.remote_files import DownloadError, check_status, open_stream
from app.platform.storage import Storage

logger = logging.getLogger(__name__)

F = ModelFamily
CONFIGS_FOLDER = ".configs"
_MAX_CONFIG_FILE_BYTES = 64 * 1024 * 1024

DEFAULT_CONFIG_REPOS: dict[tuple[ModelFamily, str | None], str] = {
    (F.SD1, None): "stable-diffusion-v1-5/stable-diffusion-v1-5",
    (F.SD2, None): "stabilityai/stable-diffusion-2-1",
    (F.SDXL, None): "stabilityai/stable-diffusion-xl-base-1.0",
    (F.SD3, "3-medium"): "stabilityai/stable-diffusion-3-medium-diffusers",
    (F.SD3, "3.5-medium"): "stabilityai/stable-diffusion-3.5-medium",
    (F.SD3, "3.5-large"): "stabilityai/stable-diffusion-3.5-large",
    (F.FLUX, "dev"): "black-forest-labs/FLUX.1-dev",
    (F.FLUX, "schnell"): "black-forest-labs/FLUX.1-schnell",
}
"""The Hub repository whose config files configure a single file of each family and variant
when no model of that family is on the machine (SD 2.x: 2.1, which predicts v)."""


# ---------------------------------------------------------------------------------------------
# Loading a single file


def is_single_file(row: DownloadedModel) -> bool:
    return row.source == "import" and Path(row.model_dir).suffix == CHECKPOINT_EXTENSION


def _inspect_for_load(row: DownloadedModel) -> CheckpointInfo:
    path = Path(row.model_dir)
    if not path.is_file():
        raise NotFoundError(
            f"The file of model {row.model_id} is missing: {row.model_dir}. Put it back, or "
            "remove the model (DELETE /models?model_id=...)."
        )
    try:
        return inspect_checkpoint(path)
    except (CheckpointRefused, SafetensorsError) as error:
        raise BadRequestError(f"Model {row.model_id} can no longer be loaded: {error}") from None
    except OSError as error:
        raise BadRequestError(f"Cannot read {row.model_dir}: {error.strerror or error}.") from None


def _wanted(info: CheckpointInfo) -> str:
    return info.family.display_name + (f" ({info.variant})" if info.variant else "")


def _same_family_folder(rows: list[DownloadedModel], info: CheckpointInfo) -> Path | None:
    for row in rows:
        folder = Path(row.model_dir)
        if not (folder / "model_index.json").is_file():
            continue
        try:
            family, variant = config_folder_family(folder)
        except ConfigFolderError:
            continue
        if family is info.family and variant == info.variant:
            return folder
    return None


def _local_folder(given: str) -> Path | None:
    folder = Path(given).expanduser()
    return folder if folder.is_dir() else None


def configs_dir(storage: Storage, repo_id: str) -> Path:
    return storage.models_dir / CONFIGS_FOLDER / repo_id.replace("/", "--")


async def fetch_configs(hub: HubClient, repo_id: str, target: Path) -> Path:
    """The config files (``CONFIG_SUFFIXES``) of Hub repository ``repo_id`` in ``target``,
    fetched once (through a temporary folder renamed into place)."""
    if (target / "model_index.json").is_file():
        return target
    token = hub.token(None)
    info = await hub.model_info(repo_id, token)
    names = [
        sibling.rfilename
        for sibling in info.siblings or []
        if sibling.rfilename.endswith(CONFIG_SUFFIXES)
        and not sibling.rfilename.endswith(".index.json")
        and ".." not in sibling.rfilename.split("/")
        and not sibling.rfilename.startswith("/")
    ]
    if "model_index.json" not in names:
        raise BadRequestError(
            f"{repo_id} is not a diffusers model repository (no model_index.json)."
        )
    temp = target.with_name(f"{IMPORT_PREFIX}{uuid.uuid4().hex}")
    where = hub.target(repo_id, token, f"the config files of {repo_id}")
    try:
        for name in names:
            url = hub.file_url(repo_id, info.sha or "main", name)
            body = bytearray()
            async with open_stream(hub.http, url, where) as answer:
                check_status(answer, where, frozenset({200}))
                async for chunk in answer.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_CONFIG_FILE_BYTES:
                        raise BadRequestError(f"{name} of {repo_id} is too large for a config.")
            out = temp / name
            await anyio.to_thread.run_sync(_write, out, bytes(body))
        target.parent.mkdir(parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(temp.rename, target)
    except DownloadError as error:
        raise hub_error(error) from None
    finally:
        if temp.exists():
            await anyio.to_thread.run_sync(shutil.rmtree, temp, True)
    logger.info("Fetched %d config files of %s", len(names), repo_id)
    return target


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class ConfigsUnavailableError(AppError):
    """A single file's configs are neither on the machine nor reachable (a 4xx: the user can
    fix it by going online once or by naming a config folder)."""

    status_code = 424


async def _config_from_hub(
    storage: Storage, hub: HubClient | None, repo_id: str, info: CheckpointInfo
) -> Path:
    cached = configs_dir(storage, repo_id)
    if (cached / "model_index.json").is_file():
        return cached
    if hub is None:
        raise ConfigsUnavailableError(_offline_message(repo_id, info))
    try:
        return await fetch_configs(hub, repo_id, cached)
    except AppError as error:  # offline, no such repository, the Hub failed: say what is needed
        raise ConfigsUnavailableError(
            f"{_offline_message(repo_id, info)} ({error.detail})"
        ) from None


def _offline_message(repo_id: str, info: CheckpointInfo) -> str:
    return (
        f"This {_wanted(info)} checkpoint needs the {_wanted(info)} config files (component "
        f"configs, scheduler, tokenizers: a few MB) of {repo_id} from the Hugging Face Hub, "
        "and they could not be fetched. Connect once to fetch them, or import the file with "
        f"'config' naming a local {_wanted(info)} diffusers folder."
    )


async def resolve_config(
    session: AsyncSession,
    storage: Storage,
    hub: HubClient | None,
    info: CheckpointInfo,
    given: str | None,
) -> Path:
    """The local diffusers folder whose configs configure a checkpoint of ``info``."""
    if given:
        folder = await anyio.to_thread.run_sync(_local_folder, given)
        if folder is not None:
            return folder
        return await _config_from_hub(storage, hub, given, info)
    rows = [row for row in await crud.list_models(session) if not is_single_file(row)]
    local = await anyio.to_thread.run_sync(_same_family_folder, rows, info)
    if local is not None:
        return local
    repo_id = DEFAULT_CONFIG_REPOS.get((info.family, info.variant))
    if repo_id is None:
        raise ConfigsUnavailableError(
            f"No config files are known for {_wanted(info)} and no diffusers model of that "
            "family is on this machine: import the file with 'config' naming a diffusers "
            f"folder (or Hub repository) of {_wanted(info)}."
        )
    return await _config_from_hub(storage, hub, repo_id, info)


async def single_file_source(
    session: AsyncSession, storage: Storage, hub: HubClient | None, row: DownloadedModel
) -> SingleFileSource:
    info = await anyio.to_thread.run_sync(_inspect_for_load, row)
    config = await resolve_config(session, storage, hub, info, row.config)
    try:
        await anyio.to_thread.run_sync(check_config_folder, info, config)
    except ConfigFolderError as error:
        raise BadRequestError(str(error)) from None
    try:
        sha256 = await file_sha256(session, Path(row.model_dir))
    except OSError as error:
        raise NotFoundError(f"Cannot read {row.model_dir}: {error.strerror or error}.") from None
    return SingleFileSource(Path(row.model_dir), config, info, sha256[:10])
