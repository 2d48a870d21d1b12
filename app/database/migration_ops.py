"""Column changes on ``loras`` that keep its AUTOINCREMENT counter, for Alembic migrations.

Batch mode rebuilds the table on SQLite, and reflection does not see AUTOINCREMENT: without
care a rebuilt table could hand out the id of a deleted LoRA again, and a history entry
naming that id would silently pick up a different LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

Columns = Sequence[tuple[str, sa.types.TypeEngine[object]]]
_TABLE_KWARGS = {"sqlite_autoincrement": True}


def add_lora_columns(columns: Columns) -> None:
    with op.batch_alter_table("loras", table_kwargs=_TABLE_KWARGS) as batch_op:
        for name, column_type in columns:
            batch_op.add_column(sa.Column(name, column_type, nullable=True))


def _last_lora_id() -> int | None:
    """SQLite's AUTOINCREMENT counter for ``loras`` (the highest id ever handed out)."""
    if op.get_bind().dialect.name != "sqlite":
        return None
    query = sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'loras'")
    value = op.get_bind().execute(query).scalar()
    return int(value) if value is not None else None


def drop_lora_columns(columns: Columns) -> None:
    last_id = _last_lora_id()
    with op.batch_alter_table("loras", table_kwargs=_TABLE_KWARGS) as batch_op:
        for name, _ in reversed(columns):
            batch_op.drop_column(name)
    if last_id is not None:
        # The rebuilt table counts from its highest remaining id; keep the old count.
        op.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = 'loras'"))
        op.execute(
            sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('loras', :seq)").bindparams(
                seq=last_id
            )
        )
