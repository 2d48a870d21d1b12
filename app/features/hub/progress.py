"""``download_step_progress`` events of one model download (CONTRACT §5).

Phase changes (``init``, ``file_start``, ``file_complete``, ``complete``) are sent as they
happen; byte counts (``chunk``) at most every ``PROGRESS_INTERVAL`` seconds. The byte count
never goes backwards, even when a file has to start over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from app.features.hub.file_plan import RepoFile, RepoPlan
from app.platform.events import EventEmitter
from app.platform.socket_events import DownloadStepProgress

PROGRESS_INTERVAL = 0.5
Phase = Literal["init", "chunk", "file_start", "file_complete", "size_update", "complete"]


class DownloadProgress:
    def __init__(
        self,
        events: EventEmitter,
        model_id: str,
        plan: RepoPlan,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = events
        self.model_id = model_id
        self.total_files = len(plan.files)
        self.total_bytes = plan.total_bytes
        self.clock = clock
        self.files_done = 0
        self.bytes_done = 0
        """Bytes of the files completed."""
        self.current_bytes = 0
        self.current_file: str | None = None
        self.reported = 0
        self._emitted_at = -PROGRESS_INTERVAL

    def started(self) -> None:
        self._emit("init")

    def file_started(self, file: RepoFile) -> None:
        self.current_file, self.current_bytes = file.remote_name, 0
        self._emit("file_start")

    def received(self, current_bytes: int) -> None:
        self.current_bytes = current_bytes
        if self.clock() - self._emitted_at >= PROGRESS_INTERVAL:
            self._emit("chunk")

    def file_completed(self, file: RepoFile) -> None:
        self.files_done += 1
        self.bytes_done += file.size if file.size is not None else self.current_bytes
        self.current_bytes = 0
        self._emit("file_complete")

    def completed(self) -> None:
        self.current_file = None
        self._emit("complete")

    def _emit(self, phase: Phase) -> None:
        self._emitted_at = self.clock()
        self.reported = max(self.reported, self.bytes_done + self.current_bytes)
        self.events.emit(
            DownloadStepProgress(
                model_id=self.model_id,
                step=self.files_done,
                total=self.total_files,
                downloaded_size=self.reported,
                total_downloaded_size=self.total_bytes,
                phase=phase,
                current_file=self.current_file,
            )
        )
