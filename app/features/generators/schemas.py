from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from app.features.config.upscalers import Upscaler
from app.features.generators.samplers import Sampler
from app.features.loras.schemas import MAX_LORAS_PER_GENERATION, LoRAConfigItem
from app.validation import DatabaseId, Integer, Number

DEFAULT_NEGATIVE_PROMPT = (
    "worst quality, low quality, normal quality, lowres, blurry, jpeg artifacts, watermark, "
    "signature, text, deformed, bad anatomy, extra limbs"
)
MAX_SIDE = 2048
MAX_IMAGES = 16


class HiresFixConfig(BaseModel):
    upscale_factor: Number = Field(ge=1.5, le=4.0)
    upscaler: Upscaler
    denoising_strength: Number = Field(ge=0.0, le=1.0)
    steps: Integer = Field(ge=0, le=150, description="0 reuses the main pass's steps.")


class GeneratorConfig(BaseModel):
    """One generation as the UI's editor form describes it.

    Width and height that are not multiples of 8 are rounded down to one when generating
    (the latent grid is 8x coarser); the config is stored as sent.
    """

    prompt: str = Field(max_length=1000)
    negative_prompt: str = Field(default=DEFAULT_NEGATIVE_PROMPT, max_length=1000)
    width: Integer = Field(default=512, ge=64, le=MAX_SIDE)
    height: Integer = Field(default=512, ge=64, le=MAX_SIDE)
    number_of_images: Integer = Field(default=1, ge=1, le=MAX_IMAGES)
    cfg_scale: Number = Field(default=7.5, ge=1.0, le=30.0)
    steps: Integer = Field(default=24, ge=1, le=150)
    seed: Integer = Field(default=-1, ge=-1, le=2**32 - 1, description="-1 picks a random seed.")
    sampler: Sampler = Sampler.EULER_A
    clip_skip: Integer = Field(default=1, ge=1, le=12)
    styles: list[str] = Field(default_factory=list, max_length=50)
    loras: list[LoRAConfigItem] = Field(default_factory=list, max_length=MAX_LORAS_PER_GENERATION)
    hires_fix: HiresFixConfig | None = None

    @field_validator("loras")
    @classmethod
    def _one_item_per_lora(cls, loras: list[LoRAConfigItem]) -> list[LoRAConfigItem]:
        ids = [item.lora_id for item in loras]
        repeated = sorted({lora_id for lora_id in ids if ids.count(lora_id) > 1})
        if repeated:
            raise ValueError(f"each LoRA may appear once; repeated lora_id: {repeated}")
        return loras


class GenerateRequest(BaseModel):
    history_id: DatabaseId
    config: GeneratorConfig


class GeneratedItem(BaseModel):
    path: str
    file_name: str


class GenerateResponse(BaseModel):
    items: list[GeneratedItem]
    nsfw_content_detected: list[bool]
    seeds: list[int] = Field(description="The seed of each image, in order (extra field).")


class SamplerOut(BaseModel):
    name: str
    value: Sampler
    description: str
