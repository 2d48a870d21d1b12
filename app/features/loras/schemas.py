from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from app.cores.lora_files.hashes import autov2, autov3
from app.cores.model_manager.model_family import ModelFamily, is_compatible
from app.database.models import LoRA, LoRAFacts, LoRASource
from app.validation import DatabaseId, Number

MAX_LORAS_PER_GENERATION = 5


class LoRAUploadRequest(BaseModel):
    file_path: str = Field(min_length=1, max_length=4096)


class LoRAConfigItem(BaseModel):
    """One LoRA of a generation. ``weight`` is the UI's slider; the optional per-component
    weights override it for the UNet (or transformer) and for the text encoder(s)."""

    lora_id: DatabaseId
    weight: Number = Field(default=1.0, ge=0.0, le=2.0)
    unet_weight: Number | None = Field(default=None, ge=0.0, le=2.0)
    text_encoder_weight: Number | None = Field(default=None, ge=0.0, le=2.0)

    @model_serializer(mode="wrap")
    def _as_sent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Stored in histories as sent: overrides the request did not give stay absent.
        data: dict[str, Any] = handler(self)
        for key in ("unet_weight", "text_encoder_weight"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class LoRAEntry(BaseModel):
    """A LoRA's own row and what follows from it: the part of ``LoRAInfo`` that is neither
    the file's facts nor its source."""

    id: int
    name: str
    file_path: str
    file_size: int
    sha256: str
    file_missing: bool = Field(description="The stored copy is gone; the LoRA cannot be used.")
    created_at: datetime
    updated_at: datetime
    compatible: bool | None = Field(
        default=None,
        description="Fits the loaded model's family; null when no model is loaded or either "
        "family is unknown.",
    )
    autov2: str = Field(description="First 10 hex digits of sha256 (CivitAI AutoV2).")
    autov3: str | None = Field(
        default=None,
        description="First 12 hex digits of tensor_sha256: CivitAI AutoV3, A1111 Lora hashes.",
    )


class LoRAInfo(LoRASource, LoRAFacts, LoRAEntry):
    """A LoRA as the UI lists it: its row, the facts extracted from the file at upload
    (None/empty for what the file does not say, and for a row not described yet) and where
    a download came from (null for uploads)."""

    @classmethod
    def of(cls, row: LoRA, loaded_family: ModelFamily | None) -> LoRAInfo:
        """The API view of a row; ``compatible`` against the family of the model loaded now.
        Looks for the file on disk: off the event loop for many rows."""
        facts = row.facts or LoRAFacts()
        entry = LoRAEntry(
            id=row.id,
            name=row.name,
            file_path=row.file_path,
            file_size=row.file_size,
            sha256=row.sha256,
            file_missing=not Path(row.file_path).is_file(),
            created_at=row.created_at,
            updated_at=row.updated_at,
            compatible=is_compatible(facts.base_model, loaded_family),
            autov2=autov2(row.sha256),
            autov3=autov3(facts.tensor_sha256),
        )
        return cls.model_validate(
            _Parts(entry, facts, row.source or LoRASource()), from_attributes=True
        )


class _Parts:
    """The fields of several models as the attributes of one object (what ``LoRAInfo``
    reads ``from_attributes``): each part's own fields, none shared (tested)."""

    def __init__(self, *parts: BaseModel) -> None:
        self._parts = parts

    def __getattr__(self, name: str) -> Any:
        for part in self._parts:
            if name in type(part).model_fields:
                return getattr(part, name)
        raise AttributeError(name)


class LoRAListResponse(BaseModel):
    loras: list[LoRAInfo]


class LoRADeleteResponse(BaseModel):
    id: int
    message: str
