"""ORM models. Every schema change goes through an Alembic migration in ``alembic/versions``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


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
    # What the file is (migration 0003; see app.features.loras.metadata). All nullable: rows
    # added before 0003 get them filled in at the next start.
    format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    components: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    network_type: Mapped[str | None] = mapped_column(String(32), nullable=True)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rank_max: Mapped[int | None] = mapped_column(Integer, nullable=True)
    alpha: Mapped[float | None] = mapped_column(Float, nullable=True)
    base_model: Mapped[str | None] = mapped_column(String(32), nullable=True)
    base_model_evidence: Mapped[str | None] = mapped_column(Text, nullable=True)
    base_model_metadata: Mapped[str | None] = mapped_column(String(32), nullable=True)
    base_model_metadata_source: Mapped[str | None] = mapped_column(Text, nullable=True)
    base_model_conflict: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    base_model_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    trigger_words: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    title: Mapped[str | None] = mapped_column(Text, nullable=True)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    author: Mapped[str | None] = mapped_column(Text, nullable=True)
    raw_metadata: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    metadata_truncated: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    tensor_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Where a downloaded LoRA came from (migration 0004): the URL (never a token), and for
    # CivitAI the model-version data (ids, names, baseModel, trainedWords, file hashes).
    source_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    civitai: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
