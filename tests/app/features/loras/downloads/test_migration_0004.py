"""Migration 0004 (download source columns) on a database holding LoRA rows from before it."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from alembic import command
from app.database.migrations import alembic_config, sync_url

_ROW = (
    "INSERT INTO loras (name, file_path, file_size, sha256, created_at, updated_at) "
    "VALUES (:name, '/x', 1, :name, '2025-01-01 00:00:00', '2025-01-01 00:00:00')"
)


def test_upgrade_keeps_rows_and_downgrade_keeps_ids_unique(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    config = alembic_config(url)
    engine = sa.create_engine(sync_url(url))
    try:
        command.upgrade(config, "0003")
        with engine.begin() as connection:
            for name in ("a", "b", "c"):
                connection.execute(sa.text(_ROW), {"name": name})
            connection.execute(sa.text("DELETE FROM loras WHERE name = 'c'"))

        command.upgrade(config, "0004")
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT id, source_url, civitai FROM loras")).all()
        assert rows == [(1, None, None), (2, None, None)]

        command.downgrade(config, "0003")
        columns = {column["name"] for column in sa.inspect(engine).get_columns("loras")}
        assert not {"source_url", "civitai"} & columns
        with engine.begin() as connection:
            connection.execute(sa.text(_ROW), {"name": "d"})
            ids = connection.execute(sa.text("SELECT id FROM loras ORDER BY id")).scalars().all()
        assert ids == [1, 2, 4]  # the deleted LoRA's id 3 is not handed out again
    finally:
        engine.dispose()
