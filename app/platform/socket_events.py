"""Every Socket.IO event the backend emits, with its payload: the UI's event contract in one
file (``../shared/CONTRACT.md`` describes the same events for the UI's side).

Each event is a frozen dataclass; its class attribute ``name`` is the Socket.IO event name
and its fields are the payload's keys, so a misspelt key or a missing field fails the type
check instead of reaching the UI. ``EventEmitter.emit`` takes one of these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal


@dataclass(frozen=True)
class SocketEvent:
    name: ClassVar[str]

    def payload(self) -> dict[str, Any]:
        return asdict(self)


# --- loading a model (ModelManager) ---------------------------------------------------------


@dataclass(frozen=True)
class ModelLoadStarted(SocketEvent):
    name: ClassVar[str] = "model_load_started"
    model_id: str


@dataclass(frozen=True)
class ModelLoadProgress(SocketEvent):
    """One of the 8 load checkpoints; ``message`` says what happens (offload decisions too)."""

    name: ClassVar[str] = "model_load_progress"
    model_id: str
    step: int
    total: int
    phase: str
    message: str


@dataclass(frozen=True)
class ModelLoadCompleted(SocketEvent):
    name: ClassVar[str] = "model_load_completed"
    model_id: str


@dataclass(frozen=True)
class ModelLoadFailed(SocketEvent):
    name: ClassVar[str] = "model_load_failed"
    model_id: str
    error: str


# --- generating (generators) ----------------------------------------------------------------


@dataclass(frozen=True)
class GenerationPhase(SocketEvent):
    name: ClassVar[str] = "generation_phase"
    phases: list[str]
    current: str


@dataclass(frozen=True)
class ImageGenerationStepEnd(SocketEvent):
    """A live preview: one per image of the batch after each denoising step."""

    name: ClassVar[str] = "image_generation_step_end"
    index: int
    current_step: int
    timestep: float
    image_base64: str


# --- downloading a model from the Hub (hub) -------------------------------------------------


@dataclass(frozen=True)
class DownloadStart(SocketEvent):
    name: ClassVar[str] = "download_start"
    model_id: str


@dataclass(frozen=True)
class DownloadStepProgress(SocketEvent):
    name: ClassVar[str] = "download_step_progress"
    model_id: str
    step: int
    total: int
    downloaded_size: int
    total_downloaded_size: int | None
    phase: Literal["init", "chunk", "file_start", "file_complete", "size_update", "complete"]
    current_file: str | None


@dataclass(frozen=True)
class DownloadCompleted(SocketEvent):
    name: ClassVar[str] = "download_completed"
    model_id: str
    path: str
    message: str


@dataclass(frozen=True)
class DownloadFailed(SocketEvent):
    name: ClassVar[str] = "download_failed"
    model_id: str
    detail: str


@dataclass(frozen=True)
class DownloadCancelled(SocketEvent):
    name: ClassVar[str] = "download_cancelled"
    model_id: str


# --- downloading a LoRA (loras/downloads) ---------------------------------------------------


@dataclass(frozen=True)
class LoRADownloadStarted(SocketEvent):
    name: ClassVar[str] = "lora_download_started"
    download_id: str
    source: str
    file_name: str


@dataclass(frozen=True)
class LoRADownloadProgress(SocketEvent):
    name: ClassVar[str] = "lora_download_progress"
    download_id: str
    bytes_done: int
    bytes_total: int | None


@dataclass(frozen=True)
class LoRADownloadCompleted(SocketEvent):
    name: ClassVar[str] = "lora_download_completed"
    download_id: str
    lora: dict[str, Any]
    """The new LoRA as ``GET /loras/{id}`` shows it."""


@dataclass(frozen=True)
class LoRADownloadFailed(SocketEvent):
    name: ClassVar[str] = "lora_download_failed"
    download_id: str
    detail: str


@dataclass(frozen=True)
class LoRADownloadCancelled(SocketEvent):
    name: ClassVar[str] = "lora_download_cancelled"
    download_id: str
