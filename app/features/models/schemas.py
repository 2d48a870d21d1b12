from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from app.validation import ModelId


class DownloadedModelInfo(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    model_id: str
    model_dir: str
    created_at: datetime
    updated_at: datetime


class LoadModelRequest(BaseModel):
    model_id: ModelId


class LoadModelResponse(BaseModel):
    model_id: str
    config: dict[str, Any]
    sample_size: int


class MessageResponse(BaseModel):
    message: str
