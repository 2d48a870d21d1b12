"""add LoRA download source: source_url and CivitAI model-version data

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[object]], ...] = (
    ("source_url", sa.Text()),
    ("civitai", sa.JSON()),
)
# As in 0003: a rebuilt table must keep AUTOINCREMENT so ids of deleted LoRAs stay unused.
_TABLE_KWARGS = {"sqlite_autoincrement": True}


def upgrade() -> None:
    with op.batch_alter_table("loras", table_kwargs=_TABLE_KWARGS) as batch_op:
        for name, column_type in _COLUMNS:
            batch_op.add_column(sa.Column(name, column_type, nullable=True))


def _last_id() -> int | None:
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
        op.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = 'loras'"))
        op.execute(
            sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('loras', :seq)").bindparams(
                seq=last_id
            )
        )
