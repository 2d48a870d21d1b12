"""Downloads as asyncio tasks: at most ``lora_download_max_parallel`` at once (the rest
queue, up to ``lora_download_max_queued`` unfinished in all; more are refused with 429),
progress on Socket.IO, cancel, and clean-up at shutdown.

Events (broadcast): ``lora_download_started`` {download_id, source, file_name};
``lora_download_progress`` {download_id, bytes_done, bytes_total} at most every 0.25 s and
every 1 % of a known size, plus the final count; ``lora_download_completed``
{download_id, lora}; ``lora_download_failed`` {download_id, detail};
``lora_download_cancelled`` {download_id}.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.cores.model_manager.model_family import ModelFamily
from app.database import crud
from app.database.models import utc_now
from app.exceptions import (
    AppError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    TooManyRequestsError,
)
from app.features.loras import service
from app.features.loras.downloads import civitai, ingest
from app.features.loras.downloads import plan as plans
from app.features.loras.downloads.download_state import Download
from app.features.loras.downloads.partial_file import PartialFile
from app.features.loras.downloads.references import check_token, parse_request, token_in
from app.features.loras.downloads.schemas import (
    DownloadSource,
    DownloadState,
    LoRADownloadRequest,
)
from app.features.loras.downloads.transfer import Transfer
from app.features.loras.schemas import LoRAInfo
from app.platform.disk_space import disk_full_error, is_disk_full
from app.platform.events import EventEmitter
from app.platform.remote_files import DownloadError, RetryPolicy, lookup_timed_out
from app.platform.socket_events import (
    LoRADownloadCancelled,
    LoRADownloadCompleted,
    LoRADownloadFailed,
    LoRADownloadProgress,
    LoRADownloadStarted,
)
from app.platform.storage import Storage
from app.platform.transfer_limits import Limits
from app.platform.worker_threads import in_thread

logger = logging.getLogger(__name__)

RECENT_FINISHED = 100
PROGRESS_INTERVAL = 0.25
PROGRESS_FRACTION = 0.01
STOP_TIMEOUT = 30.0
USER_AGENT = "localai-backend (LoRA downloads)"


class DownloadManager:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        session_factory: async_sessionmaker[AsyncSession],
        events: EventEmitter,
        loaded_family: Callable[[], ModelFamily | None],
    ) -> None:
        """``loaded_family``: the loaded model's family now, for ``compatible`` in the
        LoRA a completed download reports."""
        self.settings = settings
        self.storage = storage
        self.session_factory = session_factory
        self.events = events
        self.loaded_family = loaded_family
        self.retry = RetryPolicy(
            settings.lora_download_attempts, settings.lora_download_retry_delay
        )
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.lora_download_timeout),
            headers={"User-Agent": USER_AGENT},
        )
        self._slots = asyncio.Semaphore(settings.lora_download_max_parallel)
        self._downloads: dict[str, Download] = {}
        self._closing = False

    # --- requests ---------------------------------------------------------------------

    async def start(self, request: LoRADownloadRequest, session: AsyncSession) -> Download:
        """Check the request, learn what it can in advance (CivitAI: hashes), start."""
        if self._closing:
            raise BadRequestError("The server is shutting down.")
        self._refuse_over_limit()  # before asking any server
        reference = parse_request(request, self.settings)
        source = plans.source_of(reference)
        public_url, file_name = plans.describe(reference, self.settings)
        self._refuse_in_flight(url=public_url)
        token = request.token or (token_in(request.url) if request.url else None)
        if token is not None:
            check_token(token)
        try:
            # Bounded as a whole (only CivitAI is asked in advance): the lookup runs inside
            # this request, before the transfer's stall and deadline watch starts.
            async with asyncio.timeout(self.settings.lookup_timeout):
                plan = await plans.resolve(reference, token, self.settings, self.client, self.retry)
        except TimeoutError:
            detail = lookup_timed_out(civitai.SERVICE, self.settings.lookup_timeout)
            download = self._register(source, public_url, file_name, None)
            self._finish(download, DownloadState.FAILED, detail=detail)
            return download
        except DownloadError as error:
            download = self._register(source, public_url, file_name, None)
            self._finish(download, DownloadState.FAILED, detail=error.detail)
            return download
        if plan.expected_sha256 is not None:
            existing = await crud.get_lora_by_sha256(session, plan.expected_sha256)
            if existing is not None:
                raise ConflictError(service.duplicate_message(existing))
            self._refuse_in_flight(sha256=plan.expected_sha256)
        self._refuse_in_flight(url=plan.public_url)
        self._refuse_over_limit()  # again: others may have started while this one resolved
        download = self._register(source, plan.public_url, plan.file_name, plan)
        download.task = asyncio.create_task(
            self._run(download), name=f"lora-download-{download.id}"
        )
        download.task.add_done_callback(lambda _: self._cancelled_before_start(download))
        return download

    def get(self, download_id: str) -> Download:
        download = self._downloads.get(download_id)
        if download is None:
            raise NotFoundError(f"LoRA download {download_id} not found")
        return download

    def recent(self) -> list[Download]:
        return list(reversed(self._downloads.values()))

    async def cancel(self, download_id: str) -> Download:
        """Stop it and wait until its temporary file is gone."""
        download = self.get(download_id)
        if download.state.finished:
            raise ConflictError(
                f"LoRA download {download_id} has already {download.state.value}; "
                "there is nothing to cancel."
            )
        if download.committing or download.task is None:
            raise ConflictError(
                f"LoRA download {download_id} is being added as a LoRA; too late to cancel."
            )
        download.task.cancel()
        await asyncio.wait([download.task], timeout=STOP_TIMEOUT)
        return download

    async def aclose(self) -> None:
        """Shutdown: cancel what runs (a download writing its row finishes first), wait for
        the clean-up, close the HTTP client."""
        self._closing = True
        tasks = [d.task for d in self._downloads.values() if d.task and not d.task.done()]
        for download in self._downloads.values():
            if download.task and not download.task.done() and not download.committing:
                download.task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        await self.client.aclose()

    # --- bookkeeping ------------------------------------------------------------------

    def _refuse_in_flight(self, *, url: str | None = None, sha256: str | None = None) -> None:
        for other in self._downloads.values():
            if other.state.finished or other.plan is None:
                continue
            if other.url == url or (sha256 and other.plan.expected_sha256 == sha256):
                raise ConflictError(
                    f"'{other.file_name}' is already being downloaded (download {other.id})."
                )

    def _refuse_over_limit(self) -> None:
        waiting = sum(1 for d in self._downloads.values() if not d.state.finished)
        limit = self.settings.lora_download_max_queued
        if waiting >= limit:
            raise TooManyRequestsError(
                f"{waiting} LoRA downloads are already queued or running (the limit is {limit}, "
                "LOCALAI_LORA_DOWNLOAD_MAX_QUEUED). Wait until some have finished, or cancel "
                "some, then try again."
            )

    def _register(
        self, source: DownloadSource, url: str, file_name: str, plan: plans.Plan | None
    ) -> Download:
        download = Download(uuid.uuid4().hex[:12], source, url, file_name, plan=plan)
        self._downloads[download.id] = download
        self._prune()
        self.events.emit(LoRADownloadStarted(download.id, source.value, file_name))
        return download

    def _prune(self) -> None:
        finished = [d.id for d in self._downloads.values() if d.state.finished]
        for download_id in finished[: max(0, len(finished) - RECENT_FINISHED)]:
            del self._downloads[download_id]

    def _finish(
        self,
        download: Download,
        state: DownloadState,
        *,
        lora: LoRAInfo | None = None,
        detail: str | None = None,
    ) -> None:
        download.state, download.lora, download.detail = state, lora, detail
        download.finished_at = utc_now()
        download.committing = False
        if lora is not None:
            self.events.emit(LoRADownloadCompleted(download.id, lora.model_dump(mode="json")))
        elif state is DownloadState.CANCELLED:
            self.events.emit(LoRADownloadCancelled(download.id))
        else:
            self.events.emit(LoRADownloadFailed(download.id, detail or "The download failed."))
        self._prune()

    def _cancelled_before_start(self, download: Download) -> None:
        # A task cancelled before its first step never runs ``_run``'s handlers.
        if not download.state.finished:
            self._finish(download, DownloadState.CANCELLED)

    # --- progress ---------------------------------------------------------------------

    def _on_response(self, download: Download, file_name: str, total: int | None) -> None:
        download.file_name = file_name
        download.bytes_total = total

    def _on_progress(self, download: Download, done: int, total: int | None) -> None:
        download.bytes_done, download.bytes_total = done, total
        now = time.monotonic()
        if now - download.emitted_at < PROGRESS_INTERVAL:
            return
        last = download.emitted_bytes or 0
        if total and done != total and done - last < total * PROGRESS_FRACTION:
            return
        self._emit_progress(download, now)

    def _emit_progress(self, download: Download, now: float) -> None:
        download.emitted_at, download.emitted_bytes = now, download.bytes_done
        self.events.emit(
            LoRADownloadProgress(download.id, download.bytes_done, download.bytes_total)
        )

    # --- the work ---------------------------------------------------------------------

    async def _run(self, download: Download) -> None:
        # A finished state means the work is finished: the temporary file is removed
        # *before* the final state and event are published, so that a client that sees
        # "failed" or "cancelled" never finds a leftover in <cache>/loras.
        created: list[PartialFile] = []
        lora: LoRAInfo | None = None
        state, detail = DownloadState.FAILED, None
        try:
            async with self._slots:
                lora = await self._download_and_add(download, created)
            state = DownloadState.COMPLETED
            logger.info("LoRA download %s completed: '%s'", download.id, lora.name)
        except asyncio.CancelledError:
            state = DownloadState.CANCELLED
            logger.info("LoRA download %s cancelled", download.id)
        except (DownloadError, AppError) as error:
            detail = error.detail
            logger.warning("LoRA download %s failed: %s", download.id, error.detail)
        except Exception as error:
            if is_disk_full(error):
                detail = disk_full_error(f"'{download.file_name}'", self.storage.loras_dir).detail
                logger.warning("LoRA download %s failed: %s", download.id, detail)
            else:
                logger.exception("LoRA download %s failed unexpectedly", download.id)
                detail = "Unexpected error while adding the LoRA; see the server log."
        finally:
            for partial in created:
                await in_thread(partial.discard)
            self._finish(download, state, lora=lora, detail=detail)

    async def _download_and_add(self, download: Download, created: list[PartialFile]) -> LoRAInfo:
        plan = download.plan
        assert plan is not None
        download.state = DownloadState.DOWNLOADING
        await in_thread(lambda: created.append(PartialFile(self.storage.get_loras_dir())))
        transfer = Transfer(
            self.client,
            plan,
            created[0],
            max_size=self.settings.lora_max_file_size,
            retry=self.retry,
            limits=Limits.from_settings(self.settings),
            on_response=lambda name, total: self._on_response(download, name, total),
            on_progress=lambda done, total: self._on_progress(download, done, total),
        )
        await transfer.run()
        written = await in_thread(created[0].finish)
        download.bytes_done = written.size
        download.bytes_total = written.size
        if download.emitted_bytes != written.size:
            self._emit_progress(download, time.monotonic())
        download.state = DownloadState.VALIDATING
        ingest.check_hash(plan, written, transfer.file_name)
        staged = await ingest.validate(plan, written, transfer.file_name)
        download.committing = True
        row = await ingest.ingest(
            self.session_factory, self.storage, plan, staged, transfer.file_name
        )
        return LoRAInfo.of(row, self.loaded_family())
