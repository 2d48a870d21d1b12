from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

MAX_LORAS_PER_GENERATION = 5


class LoRAUploadRequest(BaseModel):
    file_path: str = Field(min_length=1, max_length=4096)


class LoRAConfigItem(BaseModel):
    lora_id: int
    weight: float = Field(default=1.0, ge=0.0, le=2.0)


class LoRAInfo(BaseModel):
    id: int
    name: str
    file_path: str
    file_size: int
    sha256: str
    file_missing: bool = Field(description="The stored copy is gone; the LoRA cannot be used.")
    created_at: datetime
    updated_at: datetime


class LoRAListResponse(BaseModel):
    loras: list[LoRAInfo]


class LoRADeleteResponse(BaseModel):
    id: int
    message: str
