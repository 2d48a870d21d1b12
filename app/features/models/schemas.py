from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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
    family: str = Field(
        description="The model family (sd1, sd2, sdxl, sd3, flux, a tiny test family or "
        "unknown), from the pipeline's configs; LoRAs of another family are refused."
    )
    family_evidence: str = Field(description="Why that family: widths, classes, encoders.")


class MessageResponse(BaseModel):
    message: str
