from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

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


class LoRAInfo(BaseModel):
    """A LoRA as the UI lists it. Fields after ``file_missing`` describe the file (extracted
    at upload; None/empty for what the file does not say)."""

    id: int
    name: str
    file_path: str
    file_size: int
    sha256: str
    file_missing: bool = Field(description="The stored copy is gone; the LoRA cannot be used.")
    created_at: datetime
    updated_at: datetime

    format: str | None = Field(
        default=None, description="Key format: kohya, peft or diffusers_legacy."
    )
    components: list[str] = Field(
        default_factory=list,
        description="Model parts it changes: unet, text_encoder, text_encoder_2, transformer.",
    )
    network_type: str | None = Field(default=None, description="lora, locon or dora.")
    rank: int | None = Field(default=None, description="The most common layer rank.")
    rank_max: int | None = Field(default=None, description="The largest layer rank.")
    alpha: float | None = Field(
        default=None, description="The alpha stored in the file (most common); None: = rank."
    )
    base_model: str = Field(
        default="unknown",
        description="Family it was made for, from its shapes: sd1, sd2, sdxl, sd3, flux, tiny "
        "(the embedded test model) or unknown.",
    )
    base_model_evidence: str | None = Field(
        default=None, description="Why base_model was chosen (layer widths, block names)."
    )
    base_model_metadata: str | None = Field(
        default=None, description="The family the file's metadata names, if it names one."
    )
    base_model_metadata_source: str | None = Field(
        default=None, description="The metadata field and value that named it."
    )
    base_model_conflict: bool = Field(
        default=False, description="The metadata names another family than the shapes show."
    )
    base_model_note: str | None = Field(default=None, description="Says so in a sentence.")
    compatible: bool | None = Field(
        default=None,
        description="Fits the loaded model's family; null when no model is loaded or either "
        "family is unknown.",
    )
    trigger_words: list[str] = Field(default_factory=list)
    title: str | None = None
    description: str | None = None
    author: str | None = None
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="The file's __metadata__, cleaned; each value at most 4096 characters, "
        "64 KiB in all.",
    )
    metadata_truncated: bool = False
    source_url: str | None = Field(
        default=None, description="Where it was downloaded from (no token); null for uploads."
    )
    civitai: dict[str, Any] | None = Field(
        default=None,
        description="CivitAI's model-version data (ids, names, baseModel, trainedWords, hashes).",
    )
    autov2: str = Field(description="First 10 hex digits of sha256 (CivitAI AutoV2).")
    tensor_sha256: str | None = Field(
        default=None, description="sha256 of the tensor data without the header."
    )
    autov3: str | None = Field(
        default=None,
        description="First 12 hex digits of tensor_sha256: CivitAI AutoV3, A1111 Lora hashes.",
    )


class LoRAListResponse(BaseModel):
    loras: list[LoRAInfo]


class LoRADeleteResponse(BaseModel):
    id: int
    message: str
