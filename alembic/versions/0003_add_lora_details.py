"""add LoRA details: format, base model, trigger words, metadata, payload hash

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 10:02:11.318204
"""

from collections.abc import Sequence

import sqlalchemy as sa

from app.database.migration_ops import add_lora_columns, drop_lora_columns

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[object]], ...] = (
    ("format", sa.String(length=32)),
    ("components", sa.JSON()),
    ("network_type", sa.String(length=32)),
    ("rank", sa.Integer()),
    ("rank_max", sa.Integer()),
    ("alpha", sa.Float()),
    ("base_model", sa.String(length=32)),
    ("base_model_evidence", sa.Text()),
    ("base_model_metadata", sa.String(length=32)),
    ("base_model_metadata_source", sa.Text()),
    ("base_model_conflict", sa.Boolean()),
    ("base_model_note", sa.Text()),
    ("trigger_words", sa.JSON()),
    ("title", sa.Text()),
    ("description", sa.Text()),
    ("author", sa.Text()),
    ("raw_metadata", sa.JSON()),
    ("metadata_truncated", sa.Boolean()),
    ("tensor_sha256", sa.String(length=64)),
)


def upgrade() -> None:
    add_lora_columns(_COLUMNS)


def downgrade() -> None:
    drop_lora_columns(_COLUMNS)
