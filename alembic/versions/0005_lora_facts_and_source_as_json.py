"""LoRA facts and download source as one JSON column each (facts, source)

The 19 columns of 0003 become ``facts`` (``app.database.models.LoRAFacts``: ``raw_metadata``
is its ``metadata``), the two of 0004 ``source`` (``LoRASource``); downgrade moves them back.
A row whose ``format`` is NULL was never described: its ``facts`` stay NULL (a start-up
describes it). Missing values get the defaults the API has always shown for them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00.000000
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from alembic import op
from app.database.migration_ops import add_lora_columns, drop_lora_columns

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON(none_as_null=True)
Columns = Sequence[tuple[str, sa.types.TypeEngine[Any]]]

_FACT_COLUMNS: Columns = (  # as 0003 added them
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
_SOURCE_COLUMNS: Columns = (("source_url", sa.Text()), ("civitai", sa.JSON()))  # as 0004
_OLD_COLUMNS: Columns = (*_FACT_COLUMNS, *_SOURCE_COLUMNS)
_NEW_COLUMNS: Columns = (("facts", sa.JSON()), ("source", sa.JSON()))

_loras = sa.table(
    "loras",
    sa.column("id", sa.Integer()),
    *(sa.column(name, _JSON if isinstance(kind, sa.JSON) else kind) for name, kind in _OLD_COLUMNS),
    *(sa.column(name, _JSON) for name, _ in _NEW_COLUMNS),
)
_RENAMED = {"raw_metadata": "metadata"}
"""Column name -> key in ``facts``, where they differ."""
_DEFAULTS: dict[str, Any] = {
    "components": [],
    "base_model": "unknown",
    "base_model_conflict": False,
    "trigger_words": [],
    "raw_metadata": {},
    "metadata_truncated": False,
}
"""What the API showed for a NULL column of a described row."""


def _facts(row: sa.RowMapping) -> dict[str, Any] | None:
    if row["format"] is None:
        return None
    facts: dict[str, Any] = {}
    for name, _ in _FACT_COLUMNS:
        value = row[name]
        facts[_RENAMED.get(name, name)] = _DEFAULTS.get(name) if value is None else value
    return facts


def _source(row: sa.RowMapping) -> dict[str, Any] | None:
    if row["source_url"] is None and row["civitai"] is None:
        return None
    return {name: row[name] for name, _ in _SOURCE_COLUMNS}


def upgrade() -> None:
    add_lora_columns(_NEW_COLUMNS)
    bind = op.get_bind()
    for row in bind.execute(sa.select(_loras)).mappings().all():
        facts, source = _facts(row), _source(row)
        if facts is not None or source is not None:
            bind.execute(
                sa.update(_loras).where(_loras.c.id == row["id"]).values(facts=facts, source=source)
            )
    drop_lora_columns(_OLD_COLUMNS)


def downgrade() -> None:
    add_lora_columns(_OLD_COLUMNS)
    bind = op.get_bind()
    for row in bind.execute(sa.select(_loras)).mappings().all():
        facts: dict[str, Any] = row["facts"] or {}
        source: dict[str, Any] = row["source"] or {}
        values = {name: facts.get(_RENAMED.get(name, name)) for name, _ in _FACT_COLUMNS}
        values |= {name: source.get(name) for name, _ in _SOURCE_COLUMNS}
        if any(value is not None for value in values.values()):
            bind.execute(sa.update(_loras).where(_loras.c.id == row["id"]).values(values))
    drop_lora_columns(_NEW_COLUMNS)
