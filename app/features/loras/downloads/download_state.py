"""One download as the API and the manager see it (kept in memory, not in the database)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from app.database.models import utc_now
from app.features.loras.downloads.plan import Plan
from app.features.loras.downloads.schemas import DownloadSource, DownloadState, LoRADownloadInfo
from app.features.loras.schemas import LoRAInfo


@dataclass(eq=False)
class Download:
    id: str
    source: DownloadSource
    url: str
    file_name: str
    created_at: datetime = field(default_factory=utc_now)
    state: DownloadState = DownloadState.QUEUED
    bytes_done: int = 0
    bytes_total: int | None = None
    lora: LoRAInfo | None = None
    detail: str | None = None
    finished_at: datetime | None = None
    plan: Plan | None = field(default=None, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    committing: bool = False
    emitted_at: float = float("-inf")
    emitted_bytes: int | None = None

    def info(self) -> LoRADownloadInfo:
        return LoRADownloadInfo(
            id=self.id,
            state=self.state,
            source=self.source,
            url=self.url,
            file_name=self.file_name,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            lora=self.lora,
            detail=self.detail,
            created_at=self.created_at,
            finished_at=self.finished_at,
        )
