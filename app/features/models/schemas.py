from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.validation import ModelId


class DownloadedModelInfo(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    model_id: str
    model_dir: str = Field(description="A diffusers folder, or an imported single file.")
    created_at: datetime
    updated_at: datetime
    source: str = Field(
        default="hub",
        description="hub (downloaded, or found in the Hugging Face cache), "
        "import (the user's own file or folder) or embedded (the built-in test model).",
    )
    family: str | None = Field(
        default=None,
        description="The model family (sd1, sd2, sdxl, sd3, flux, tiny...); null when not known.",
    )
    variant: str | None = Field(
        default=None, description="FLUX.1 dev/schnell, the SD3 sizes; null otherwise."
    )
    size: int | None = Field(default=None, description="Bytes, for imports; else null.")
    missing: bool = Field(
        default=False, description="Its files are gone from model_dir (moved or deleted)."
    )


class ImportModelRequest(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    path: str = Field(
        min_length=1,
        max_length=4096,
        description="A diffusers folder (with model_index.json) or a single-file .safetensors "
        "checkpoint (A1111/ComfyUI layout) on this machine.",
    )
    name: ModelId | None = Field(
        default=None,
        description="The model's id; default: the folder's name or the file's "
        "name without extension.",
    )
    config: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="For a single file: the diffusers folder or Hub repo id whose config files "
        "(component configs, scheduler, tokenizers) configure it; default: a model of the "
        "same family on this machine, else the family's reference repository on the Hub.",
    )
    copy_in: bool = Field(
        default=False,
        alias="copy",
        description="Copy into the cache folder instead of registering the "
        "file in place (the default: the file is only ever read).",
    )


class ImportModelResponse(DownloadedModelInfo):
    evidence: str = Field(description="What was found in it, and why that family.")


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
