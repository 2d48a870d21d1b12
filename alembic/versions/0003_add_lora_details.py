"""add LoRA details: format, base model, trigger words, metadata, payload hash

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 10:02:11.318204
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

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
# Batch mode may rebuild the table on SQLite, and reflection does not see AUTOINCREMENT:
# without this a rebuilt table could hand out the id of a deleted LoRA again.
_TABLE_KWARGS = {"sqlite_autoincrement": True}


def upgrade() -> None:
    with op.batch_alter_table("loras", table_kwargs=_TABLE_KWARGS) as batch_op:
        for name, column_type in _COLUMNS:
            batch_op.add_column(sa.Column(name, column_type, nullable=True))


def _last_id() -> int | None:
    """SQLite's AUTOINCREMENT counter for ``loras`` (the highest id ever handed out)."""
    if op.get_bind().dialect.name != "sqlite":
        return None
    query = sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'loras'")
    value = op.get_bind().execute(query).scalar()
    return int(value) if value is not None else None


def downgrade() -> None:
    last_id = _last_id()
    with op.batch_alter_table("loras", table_kwargs=_TABLE_KWARGS) as batch_op:
        for name, _ in reversed(_COLUMNS):
            batch_op.drop_column(name)
    if last_id is not None:
        # The rebuilt table starts counting from its highest remaining id; keep the old count.
        op.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = 'loras'"))
        op.execute(
            sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('loras', :seq)").bindparams(
                seq=last_id
            )
        )
