"""Requests and responses of the hub routes (CONTRACT §3.3, §3.4)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# --- recommendations -------------------------------------------------------------------

SectionId = Literal["high-performance", "standard", "lightweight"]
SECTION_ORDER: tuple[SectionId, ...] = ("high-performance", "standard", "lightweight")
"""The carousel's sections, most capable first (the order of the catalogue and the page)."""


class RecommendedModel(BaseModel):
    """A model of the first-run carousel. The curated catalogue validates into this type."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    id: str = Field(
        pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", description="Hugging Face repository id."
    )
    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    memory_requirement_gb: int = Field(
        gt=0, description="GiB of GPU memory to generate an image at the model's size (float16)."
    )
    model_size: str = Field(
        pattern=r"^\d+(\.\d+)? GB$", description="Download size, e.g. '2.7 GB'."
    )
    tags: list[str]
    is_recommended: bool = Field(description="One of the section's best picks.")


class RecommendationSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: SectionId
    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    is_recommended: bool = Field(
        default=False, description="True for the section that suits this machine."
    )
    models: list[RecommendedModel] = Field(min_length=1)


class Recommendations(BaseModel):
    sections: list[RecommendationSection]
    default_section: SectionId
    default_selected_id: str = Field(description="A model of the default section.")


# --- search, details, downloads --------------------------------------------------------
