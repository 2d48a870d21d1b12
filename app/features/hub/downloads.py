"""Model downloads from the Hub (CONTRACT §3.4): one asyncio task per repository.

``POST /downloads`` waits for the task; a second request for the same repository joins it
instead of starting another, and a client that goes away does not stop it (the next request
joins or finds the model there). ``DELETE /downloads/{model_id}`` cancels it.

Files go to a ``.download-`` folder in ``<cache>/models`` (removed at start-up if a crash left
one), which is renamed to the model's folder once every file is complete and checked; the
row in ``downloaded_models`` comes last. A failure or a cancellation removes the folder: no
partial model and no row remain.

Events (broadcast): ``download_start`` {model_id}; ``download_step_progress`` (see
:mod:`progress`); ``download_completed`` {model_id, path, message}; and, which the UI does not
listen to, ``download_failed`` {model_id, detail} and ``download_cancelled`` {model_id}.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.cores.model_manager.device import resolve_device
from app.database import crud
from app.exceptions import AppError, ConflictError, InsufficientStorageError, NotFoundError
from app.features.config.service import read_user_config
from app.features.hub.file_plan import (
    MODEL_INDEX,
    RepoFile,
    RepoPlan,
    check_is_pipeline,
    model_index_file,
    parse_model_index,
    plan_files,
)
from app.features.hub.hub_client import HubClient, hub_error
from app.features.hub.progress import DownloadProgress
from app.features.hub.repo_fetch import FileFetch, FileSource, OnBytes
from app.platform.disk_space import disk_full_error, is_disk_full
from app.platform.events import EventEmitter
from app.platform.remote_files import DownloadError, Target
from app.platform.socket_events import (
    DownloadCancelled,
    DownloadCompleted,
    DownloadFailed,
    DownloadStart,
)
from app.platform.storage import Storage
from app.platform.transfer_limits import Limits, Watchdog
from app.platform.worker_threads import in_thread

logger = logging.getLogger(__name__)

DOWNLOAD_PREFIX = ".download-"
FREE_SPACE_MARGIN = 256 * 1024 * 1024
"""Kept free beyond the model's size: the database and images need room too."""
NO_DEADLINE = 7 * 24 * 3600.0
"""Models are gigabytes: only a stall ends a download that keeps receiving."""
GB = 1000**3


def _ignore_bytes(_count: int) -> None:
    pass


@dataclass(frozen=True)
class DownloadedRepo:
    model_id: str
    path: Path
    message: str


class ModelDownloads:
    """Owns the running model downloads (one per app, on ``app.state.model_downloads``)."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        session_factory: async_sessionmaker[AsyncSession],
        events: EventEmitter,
        hub: HubClient,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.session_factory = session_factory
        self.events = events
        self.hub = hub
        self._running: dict[str, asyncio.Task[DownloadedRepo]] = {}
        self._waiting: dict[str, int] = {}

    async def download(self, model_id: str, hf_token: str | None) -> DownloadedRepo:
        token = self.hub.token(hf_token)
        existing = await self._already_here(model_id)
        if existing is not None:
            return existing
        task = self._running.get(model_id)
        if task is None:
            task = asyncio.create_task(self._run(model_id, token), name=f"download {model_id}")
            self._running[model_id] = task
            task.add_done_callback(lambda done: self._finished(model_id, done))
        self._waiting[model_id] = self._waiting.get(model_id, 0) + 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # cancelled by DELETE /downloads, not by this request's end
                raise ConflictError(f"The download of {model_id} was cancelled.") from None
            raise
        finally:
            self._waiting[model_id] -= 1
            if not self._waiting[model_id]:
                del self._waiting[model_id]

    def waiting(self, model_id: str) -> int:
        """Requests waiting for the download of ``model_id`` (for logs and tests)."""
        return self._waiting.get(model_id, 0)

    async def cancel(self, model_id: str) -> None:
        task = self._running.get(model_id)
        if task is None:
            raise NotFoundError(f"No download of {model_id} is running.")
        task.cancel()
        await asyncio.wait([task])

    async def aclose(self) -> None:
        """Cancel every download (shutdown); their folders are removed."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _finished(self, model_id: str, task: asyncio.Task[DownloadedRepo]) -> None:
        if self._running.get(model_id) is task:
            del self._running[model_id]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody waited for is not "never retrieved"

    async def _already_here(self, model_id: str) -> DownloadedRepo | None:
        async with self.session_factory() as session:
            row = await crud.get_model(session, model_id)
        if row is None or not (Path(row.model_dir) / MODEL_INDEX).is_file():
            return None
        return DownloadedRepo(model_id, Path(row.model_dir), f"Model {model_id} is already here.")

    # --- the work ---------------------------------------------------------------------

    async def _run(self, model_id: str, token: str | None) -> DownloadedRepo:
        self.events.emit(DownloadStart(model_id))
        folder = self.storage.models_dir / f"{DOWNLOAD_PREFIX}{uuid.uuid4().hex}"
        try:
            done = await self._fetch_and_register(model_id, token, folder)
        except asyncio.CancelledError:
            await in_thread(shutil.rmtree, folder, True)
            self.events.emit(DownloadCancelled(model_id))
            raise
        except BaseException as error:
            await in_thread(shutil.rmtree, folder, True)
            failure = self._as_app_error(error, model_id)
            self.events.emit(DownloadFailed(model_id, failure.detail))
            if failure is error:
                raise
            raise failure from error
        self.events.emit(DownloadCompleted(model_id, str(done.path), done.message))
        return done

    def _as_app_error(self, error: BaseException, model_id: str) -> AppError:
        if isinstance(error, AppError):
            return error
        if isinstance(error, DownloadError):
            return hub_error(error)
        if is_disk_full(error):
            return disk_full_error(f"the model {model_id}", self.storage.models_dir)
        logger.error("Download of %s failed", model_id, exc_info=error)
        return AppError(f"Failed to download model {model_id}.")

    async def _fetch_and_register(
        self, model_id: str, token: str | None, folder: Path
    ) -> DownloadedRepo:
        info = await self.hub.model_info(model_id, token)
        check_is_pipeline(info)
        source = (model_id, info.sha or "main", self.hub.target(model_id, token))
        watchdog = Watchdog(Limits(self.settings.model_download_stall_timeout, NO_DEADLINE))
        async with watchdog.watching():
            await self._fetch(model_index_file(info), folder, source, watchdog)
            index = parse_model_index(await in_thread((folder / MODEL_INDEX).read_bytes), model_id)
            plan = plan_files(info, index, want_fp16=self._runs_in_float16())
            await in_thread(self._check_space, plan, folder)
            progress = DownloadProgress(self.events, model_id, plan)
            progress.started()
            for file in plan.files:
                progress.file_started(file)
                if file.remote_name != MODEL_INDEX:
                    await self._fetch(file, folder, source, watchdog, progress.received)
                progress.file_completed(file)
        final = self.storage.model_dir_for(model_id)
        await in_thread(_replace_folder, folder, final)
        try:
            async with self.session_factory() as session:
                await crud.upsert_model(session, model_id, str(final))
                await session.commit()
        except BaseException:
            await in_thread(shutil.rmtree, final, True)
            raise
        progress.completed()
        logger.info(
            "Downloaded %s (%d files, %d bytes)", model_id, len(plan.files), plan.total_bytes
        )
        return DownloadedRepo(model_id, final, f"Model {model_id} downloaded successfully.")

    async def _fetch(
        self,
        file: RepoFile,
        folder: Path,
        source: tuple[str, str, Target],
        watchdog: Watchdog,
        on_bytes: OnBytes = _ignore_bytes,
    ) -> None:
        model_id, revision, target = source
        url = self.hub.file_url(model_id, revision, file.remote_name)
        fetch = FileFetch(
            self.hub.http, FileSource(url, target), file, folder, self.hub.retry, watchdog, on_bytes
        )
        await fetch.run()

    def _runs_in_float16(self) -> bool:
        device = resolve_device(self.settings.device, read_user_config(self.storage).device_index)
        return device.type == "cuda"

    def _check_space(self, plan: RepoPlan, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        needed = plan.total_bytes
        if free < needed + FREE_SPACE_MARGIN:
            raise InsufficientStorageError(
                f"Not enough disk space for {plan.repo_id}: its files take "
                f"{_size_text(needed)}, and only {_size_text(free)} are free on the drive "
                f"that holds {self.storage.models_dir.resolve()} (keeping "
                f"{_size_text(FREE_SPACE_MARGIN)} spare). Free some space, then try again."
            )


def _size_text(count: int) -> str:
    return f"{count / GB:.2f} GB" if count >= GB else f"{count / 1000**2:.1f} MB"


def _replace_folder(source: Path, target: Path) -> None:
    """Move the complete download into place; a stale folder there (files of a model whose
    row is gone) is removed first."""
    if target.exists():
        shutil.rmtree(target)
    source.rename(target)


def remove_unfinished(models_dir: Path) -> None:
    """Remove the folders of downloads a crash interrupted (run at start-up)."""
    for entry in models_dir.glob(f"{DOWNLOAD_PREFIX}*"):
        shutil.rmtree(entry, ignore_errors=True)
