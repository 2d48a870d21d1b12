from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class GeneratedImageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    history_id: int
    path: str
    file_name: str
    is_nsfw: bool
    seed: int | None
    created_at: datetime
    updated_at: datetime


class HistoryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    prompt: str
    model: str
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    generated_images: list[GeneratedImageOut]


class MessageResponse(BaseModel):
    message: str
