"""Request and response bodies of the ``/loras/download*`` endpoints."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field, model_validator

from app.features.loras.schemas import LoRAInfo


class DownloadState(StrEnum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    VALIDATING = "validating"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (DownloadState.COMPLETED, DownloadState.FAILED, DownloadState.CANCELLED)


class DownloadSource(StrEnum):
    URL = "url"
    HUGGINGFACE = "huggingface"
    CIVITAI = "civitai"


class HuggingFaceFileRef(BaseModel):
    repo_id: str = Field(
        min_length=3,
        max_length=200,
        pattern=r"^[\w.\-]+/[\w.\-]+$",
        examples=["owner/some-lora"],
    )
    filename: str = Field(min_length=1, max_length=1024, examples=["lora.safetensors"])
    revision: str | None = Field(default=None, min_length=1, max_length=255)


class CivitAIVersionRef(BaseModel):
    model_version_id: int = Field(gt=0)


class LoRADownloadRequest(BaseModel):
    """Exactly one of ``url``, ``huggingface``, ``civitai``. A Hugging Face file URL
    (``/<repo>/blob|resolve/<revision>/<file>``) or a CivitAI model page
    (``/models/<id>?modelVersionId=<vid>``, or ``/models/<id>`` for its latest version) given
    as ``url`` is routed to that service."""

    url: str | None = Field(default=None, min_length=1, max_length=4096)
    huggingface: HuggingFaceFileRef | None = None
    civitai: CivitAIVersionRef | None = None
    token: str | None = Field(
        default=None,
        max_length=4096,
        repr=False,
        description="Access token, sent as 'Authorization: Bearer' to that service only; "
        "never stored.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> LoRADownloadRequest:
        given = [self.url is not None, self.huggingface is not None, self.civitai is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of url, huggingface, civitai")
        return self


class LoRADownloadInfo(BaseModel):
    id: str
    state: DownloadState
    source: DownloadSource
    url: str = Field(description="What is fetched (without any token).")
    file_name: str
    bytes_done: int
    bytes_total: int | None = Field(description="null while the size is unknown.")
    lora: LoRAInfo | None = Field(default=None, description="The added LoRA, once completed.")
    detail: str | None = Field(default=None, description="Why it failed.")
    created_at: datetime
    finished_at: datetime | None = None


class LoRADownloadListResponse(BaseModel):
    downloads: list[LoRADownloadInfo] = Field(description="Newest first.")


class LoRADownloadCancelResponse(BaseModel):
    id: str
    message: str
