"""ORM models. Every schema change goes through an Alembic migration in ``alembic/versions``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import JSON, DateTime, Dialect, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utc_now() -> datetime:
    """Naive UTC, the form the UI expects (ISO-8601 without offset)."""
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


class Base(DeclarativeBase):
    pass


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utc_now, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime, default=utc_now, onupdate=utc_now, nullable=False
    )


class DownloadedModel(Base, TimestampMixin):
    """A model available on this machine (the embedded one, or one the user added)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(512), unique=True, nullable=False)
    model_dir: Mapped[str] = mapped_column(Text, nullable=False)
    """A diffusers folder, or (an import) a single ``.safetensors`` checkpoint file."""
    # Migration 0006: where it came from, and what an import found in it.
    source: Mapped[str] = mapped_column(String(16), nullable=False, server_default="hub")
    """``hub`` (downloaded or found in the Hugging Face cache), ``import`` or ``embedded``."""
    family: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """The family found at import (``ModelFamily`` value); NULL: read from the folder."""
    variant: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """FLUX.1 dev/schnell, the SD3 sizes (``CheckpointInfo.variant``)."""
    size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Bytes of the file or of the folder's files, at import."""
    sha256: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    """Content hash of an import (the file's; for a folder, of its denoiser weights)."""
    config: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The config folder or Hub repo id given at import for a single file's configs."""


class FileHash(Base):
    """A file's sha256, remembered by (path, size, modification time): a big checkpoint is
    read once, not at every import or load (migration 0006)."""

    __tablename__ = "file_hashes"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    mtime_ns: Mapped[int] = mapped_column(Integer, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)


class History(Base, TimestampMixin):
    """One press of the generate button: the prompt, the model and the config as sent."""

    __tablename__ = "histories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    model: Mapped[str] = mapped_column(String(512), nullable=False)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    generated_images: Mapped[list[GeneratedImage]] = relationship(
        back_populates="history",
        cascade="all, delete-orphan",
        order_by="GeneratedImage.id",
        lazy="selectin",
    )


class GeneratedImage(Base, TimestampMixin):
    """A PNG written under the cache folder and served at ``path``."""

    __tablename__ = "generated_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    history_id: Mapped[int] = mapped_column(
        ForeignKey("histories.id", ondelete="CASCADE"), index=True, nullable=False
    )
    path: Mapped[str] = mapped_column(Text, nullable=False)
    file_name: Mapped[str] = mapped_column(String(255), nullable=False)
    is_nsfw: Mapped[bool] = mapped_column(default=False, nullable=False)
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    history: Mapped[History] = relationship(back_populates="generated_images")


class LoRAFacts(BaseModel):
    """What a LoRA file is, for the people choosing one: extracted once from the stored copy
    (``app.cores.lora_files.metadata.describe_lora``), kept whole in ``loras.facts`` and shown
    as is by the API (``LoRAInfo``). The defaults say "not known"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str | None = Field(
        default=None, description="Key names: kohya, peft, diffusers_legacy or xlabs."
    )
    components: tuple[str, ...] = Field(
        default_factory=tuple,
        description="Model parts it changes: unet, text_encoder, text_encoder_2, transformer.",
    )
    network_type: str | None = Field(
        default=None, description="lora, locon, loha, lokr, full or dora (the most specific)."
    )
    rank: int | None = Field(default=None, description="The most common layer rank.")
    rank_max: int | None = Field(default=None, description="The largest layer rank.")
    alpha: float | None = Field(
        default=None, description="The alpha stored in the file (most common); None: = rank."
    )
    base_model: str = Field(
        default="unknown",
        description="Family it was made for, from its shapes: sd1, sd2, sdxl, sd3, flux, tiny "
        "(the embedded test model), tiny-sd2, tiny-sdxl, tiny-sd3, tiny-flux (the test "
        "suite's family models) or unknown.",
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
    trigger_words: tuple[str, ...] = Field(default_factory=tuple)
    title: str | None = None
    description: str | None = None
    author: str | None = None
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="The file's __metadata__, cleaned; each value at most 4096 characters, "
        "64 KiB in all.",
    )
    metadata_truncated: bool = False
    tensor_sha256: str | None = Field(
        default=None, description="sha256 of the tensor data without the header."
    )


class LoRASource(BaseModel):
    """Where a downloaded LoRA came from (``loras.source``; none for an upload)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_url: str | None = Field(
        default=None, description="Where it was downloaded from (no token); null for uploads."
    )
    civitai: dict[str, Any] | None = Field(
        default=None,
        description="CivitAI's model-version data (ids, names, baseModel, trainedWords, hashes).",
    )


M = TypeVar("M", bound=BaseModel)


class PydanticJSON(TypeDecorator[M]):
    """A pydantic model stored as JSON, validated into the model on load; None is SQL NULL."""

    impl = JSON(none_as_null=True)
    cache_ok = True

    def __init__(self, model: type[M]) -> None:
        super().__init__()
        self.model = model

    def process_bind_param(self, value: M | None, dialect: Dialect) -> Any:
        return None if value is None else value.model_dump(mode="json")

    def process_result_value(self, value: Any | None, dialect: Dialect) -> M | None:
        return None if value is None else self.model.model_validate(value)


class LoRA(Base, TimestampMixin):
    """A LoRA file copied into ``<cache>/loras``; the user's original is never touched."""

    __tablename__ = "loras"
    # Never reuse an id: a history entry that names a deleted LoRA must not pick up a new one.
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    file_path: Mapped[str] = mapped_column(Text, nullable=False)
    file_size: Mapped[int] = mapped_column(Integer, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    source_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Migration 0005. NULL facts: a row added before LoRAs were described (migration 0003),
    # described at the next start. NULL source: an upload.
    facts: Mapped[LoRAFacts | None] = mapped_column(PydanticJSON(LoRAFacts), nullable=True)
    source: Mapped[LoRASource | None] = mapped_column(PydanticJSON(LoRASource), nullable=True)
