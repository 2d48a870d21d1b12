"""add LoRA download source: source_url and CivitAI model-version data

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa

from app.database.migration_ops import add_lora_columns, drop_lora_columns

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[object]], ...] = (
    ("source_url", sa.Text()),
    ("civitai", sa.JSON()),
)


def upgrade() -> None:
    add_lora_columns(_COLUMNS)


def downgrade() -> None:
    drop_lora_columns(_COLUMNS)
