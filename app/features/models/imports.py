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

import hashlib
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
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
from app.cores.model_manager.model_hash import remember_file_sha256, weight_files
from app.cores.model_manager.pipeline_manager import SingleFileSource
from app.cores.model_manager.single_file import (
    CONFIG_SUFFIXES,
    ConfigFolderError,
    check_config_folder,
    config_folder_family,
)
from app.database import crud, hooks
from app.database.models import DownloadedModel
from app.exceptions import AppError, BadRequestError, ConflictError, NotFoundError
from app.features.hub.hub_client import HubClient, hub_error
from app.platform.events import EventEmitter
from app.platform.remote_files import DownloadError, check_status, open_stream
from app.platform.socket_events import DownloadStepProgress
from app.platform.storage import Storage
from app.validation import control_character_in

logger = logging.getLogger(__name__)

F = ModelFamily
CHECKPOINT_EXTENSION = ".safetensors"
PICKLE_EXTENSIONS = frozenset({".ckpt", ".pt", ".bin", ".pth", ".pkl"})
IMPORT_PREFIX = ".import-"
"""A copy under way in ``<cache>/models``; one left by a crash is removed at the next start."""
CONFIGS_FOLDER = ".configs"
_CHUNK = 4 * 1024 * 1024
_PROGRESS_INTERVAL = 0.5
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


class ImportRefused(BadRequestError):
    """The path cannot be imported as a model (400; says why)."""


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
# Checking the user's path


def _user_path(text: str) -> Path:
    found = control_character_in(text)
    if found is not None:
        raise ImportRefused(
            f"The path is invalid: it contains a control character (U+{ord(found):04X})."
        )
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise ImportRefused(f"The path is invalid: there is no home folder for {text}.") from None


def pickle_refusal(name: str) -> str | None:
    """The LoRA upload's explanation for a pickle-based file, for a model."""
    suffix = Path(name).suffix.lower()
    if suffix not in PICKLE_EXTENSIONS:
        return None
    return (
        f"'{name}' is a pickle-based file ({suffix}). Only .safetensors model files are "
        "accepted, because pickle files can run arbitrary code when loaded; convert it to "
        ".safetensors first."
    )


@dataclass(frozen=True)
class _Checked:
    path: Path
    is_folder: bool
    family: ModelFamily
    variant: str | None
    evidence: str
    size: int
    info: CheckpointInfo | None = None


def _check_folder(path: Path) -> _Checked:
    if not (path / "model_index.json").is_file():
        raise ImportRefused(
            f"'{path}' is a folder without model_index.json: not a diffusers model folder. "
            "Import a diffusers folder or a single .safetensors checkpoint file."
        )
    try:
        family, variant = config_folder_family(path)
    except ConfigFolderError as error:
        raise ImportRefused(str(error)) from None
    if not weight_files(path):
        raise ImportRefused(
            f"'{path}' has no denoiser weights (unet/ or transformer/ "
            "diffusion_pytorch_model*.safetensors): it is not a complete diffusers model."
        )
    size = sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())
    evidence = f"diffusers folder of {family.display_name}" + (f" ({variant})" if variant else "")
    return _Checked(path, True, family, variant, evidence, size)


def _check_file(path: Path, info_stat: os.stat_result) -> _Checked:
    refusal = pickle_refusal(path.name)
    if refusal is not None:
        raise ImportRefused(refusal)
    if path.suffix.lower() != CHECKPOINT_EXTENSION:
        raise ImportRefused(
            f"'{path.name}' is not a .safetensors file: import a single-file .safetensors "
            "checkpoint or a diffusers folder (with model_index.json)."
        )
    if info_stat.st_size == 0:
        raise ImportRefused(f"File is empty: '{path.name}'")
    if not os.access(path, os.R_OK):
        raise ImportRefused(f"Cannot read '{path}': permission denied.")
    try:
        info = inspect_checkpoint(path)
    except CheckpointRefused as error:
        raise ImportRefused(error.detail) from None
    except SafetensorsError as error:
        raise ImportRefused(str(error)) from None
    except OSError as error:
        raise ImportRefused(f"Cannot read '{path}': {error.strerror or error}.") from None
    return _Checked(path, False, info.family, info.variant, info.evidence, info_stat.st_size, info)


def check_path(text: str) -> _Checked:
    """Everything that reads only headers and configs (blocking: run in a thread)."""
    path = _user_path(text)
    try:
        info_stat = path.stat()
    except FileNotFoundError:
        raise ImportRefused(f"File does not exist: {text}") from None
    except OSError as error:
        raise ImportRefused(f"Cannot access {text}: {error.strerror}") from None
    if stat.S_ISDIR(info_stat.st_mode):
        return _check_folder(path)
    if not stat.S_ISREG(info_stat.st_mode):
        raise ImportRefused(f"Path is not a file or a folder: {text}")
    return _check_file(path, info_stat)


# ---------------------------------------------------------------------------------------------
# Content hashes, remembered by (path, size, mtime)


def _sha256_of(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if on_bytes is not None:
                on_bytes(done)
    return digest.hexdigest()


async def file_sha256(session: AsyncSession, path: Path) -> str:
    """The sha256 of the file at ``path``, from the cache when its size and mtime match."""
    resolved = await anyio.to_thread.run_sync(path.resolve)
    info = await anyio.to_thread.run_sync(resolved.stat)
    key = str(resolved)
    cached = await crud.cached_file_hash(session, key, info.st_size, info.st_mtime_ns)
    if cached is None:
        cached = await anyio.to_thread.run_sync(_sha256_of, resolved)
        await crud.remember_file_hash(session, key, info.st_size, info.st_mtime_ns, cached)
    remember_file_sha256(resolved, info.st_size, info.st_mtime_ns, cached)
    return cached


async def content_sha256(session: AsyncSession, checked: _Checked) -> str:
    if not checked.is_folder:
        return await file_sha256(session, checked.path)
    files = await anyio.to_thread.run_sync(weight_files, checked.path)
    parts = [
        f"{file.relative_to(checked.path).as_posix()}:{await file_sha256(session, file)}"
        for file in files
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Copying into <cache>/models


class _CopyProgress:
    def __init__(self, events: EventEmitter, model_id: str, name: str, total: int) -> None:
        self.events, self.model_id, self.name, self.total = events, model_id, name, total
        self._at = 0.0

    def emit(self, phase: str, done: int, step: int = 0) -> None:
        self._at = time.monotonic()
        self.events.emit(
            DownloadStepProgress(
                model_id=self.model_id,
                step=step,
                total=1,
                downloaded_size=done,
                total_downloaded_size=self.total,
                phase=phase,  # type: ignore[arg-type]  # one of the contract's phases
                current_file=None if phase == "complete" else self.name,
            )
        )

    def received(self, done: int) -> None:
        if time.monotonic() - self._at >= _PROGRESS_INTERVAL:
            self.emit("chunk", done)


def _copy_file(source: Path, target: Path, progress: _CopyProgress) -> str:
    """Copy ``source`` to ``target`` (a new file), fsynced; the sha256 of what was copied."""
    digest = hashlib.sha256()
    done = 0
    with source.open("rb") as reader, target.open("xb") as writer:
        while chunk := reader.read(_CHUNK):
            writer.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            progress.received(done)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_in(checked: _Checked, final: Path, progress: _CopyProgress, sha256: str) -> None:
    """Copy the import to ``final`` through a temporary name; nothing is left on failure."""
    temp = final.with_name(f"{IMPORT_PREFIX}{uuid.uuid4().hex}")
    try:
        progress.emit("init", 0)
        progress.emit("file_start", 0)
        if checked.is_folder:
            done = 0

            def copy_counted(src: str, dst: str) -> object:
                nonlocal done
                copied = shutil.copy2(src, dst)
                with open(dst, "rb+") as handle:
                    os.fsync(handle.fileno())
                done += Path(dst).stat().st_size
                progress.received(done)
                return copied

            shutil.copytree(checked.path, temp, copy_function=copy_counted)
        else:
            copied = _copy_file(checked.path, temp, progress)
            if copied != sha256:
                raise ImportRefused(
                    f"'{checked.path.name}' changed while it was copied; import it again."
                )
        if final.exists():
            raise ConflictError(f"'{final.name}' already exists in the models folder.")
        temp.rename(final)
        _fsync_folder(final.parent)
    except BaseException:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        raise
    progress.emit("file_complete", checked.size, step=1)
    progress.emit("complete", checked.size, step=1)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def copy_target(storage: Storage, model_id: str, is_folder: bool) -> Path:
    folder = storage.model_dir_for(model_id)
    name = folder.name.replace("..", "_").lstrip(".") or "model"
    folder = folder.with_name(name)
    return folder if is_folder else folder.with_name(name + CHECKPOINT_EXTENSION)


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
        progress = _CopyProgress(events, model_id, checked.path.name, checked.size)
        await anyio.to_thread.run_sync(_copy_in, checked, final, progress, sha256)
        hooks.after_rollback(session, lambda: _remove(final))
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
