"""Requests and responses of the hub routes (CONTRACT §3.3, §3.4)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.validation import HubRepoId

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

SearchSort = Literal["likes", "downloads", "trending", "created", "modified"]


class ModelSearchEntry(BaseModel):
    id: str
    author: str | None = None
    likes: int | None = None
    trending_score: float | None = None
    downloads: int = 0
    tags: list[str] = Field(default_factory=list)
    is_downloaded: bool
    size_mb: float | None = None
    description: str | None = None


class ModelSearchResponse(BaseModel):
    models_search_info: list[ModelSearchEntry]


class RepoFileInfo(BaseModel):
    """One file of a repository (the Hub's ``siblings[]``)."""

    model_config = ConfigDict(extra="allow")

    rfilename: str
    size: int | None = None


class ModelDetails(BaseModel):
    """The Hub's model info, passed through: the fields the UI reads are typed, the rest
    (card data, config, dates...) travels as the Hub sent it."""

    model_config = ConfigDict(extra="allow")

    id: str
    author: str | None = None
    downloads: int = 0
    likes: int = 0
    tags: list[str] = Field(default_factory=list)
    spaces: list[str] = Field(default_factory=list)
    siblings: list[RepoFileInfo] = Field(default_factory=list)
    is_downloaded: bool = False


class DownloadRequest(BaseModel):
    model_id: HubRepoId
    hf_token: str | None = Field(
        default=None,
        max_length=1000,
        description="Hugging Face access token for a gated or private repository; used for "
        "this download only, never stored or logged.",
    )


class DownloadResponse(BaseModel):
    model_id: str
    path: str
    message: str


class DownloadCancelResponse(BaseModel):
    message: str
