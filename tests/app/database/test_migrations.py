"""Alembic migrations and the SQLite connection settings, on real database files: the whole
chain, and each migration of the ``loras`` table on rows written before it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import FastAPI

from alembic import command
from app.database.migrations import alembic_config, downgrade_to_base, sync_url, upgrade_to_head
from app.database.models import Base
from app.database.session import BUSY_TIMEOUT_MS

TABLES = set(Base.metadata.tables)  # every table the ORM declares


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def sync_engine(database_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url(database_url))
    yield engine
    engine.dispose()


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def _revision(engine: sa.Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _columns(engine: sa.Engine, table: str) -> set[str]:
    return {column["name"] for column in sa.inspect(engine).get_columns(table)}


def test_upgrade_creates_the_tables(database_url: str, sync_engine: sa.Engine) -> None:
    upgrade_to_head(database_url)
    assert {"models", "histories", "generated_images"} <= TABLES
    assert _tables(sync_engine) == TABLES | {"alembic_version"}
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert head is not None
    assert _revision(sync_engine) == head
    indexes = sa.inspect(sync_engine).get_indexes("generated_images")
    assert [i["column_names"] for i in indexes] == [["history_id"]]
    upgrade_to_head(database_url)  # at head already: nothing to do, nothing breaks
    assert _revision(sync_engine) == head


def test_downgrade_to_base_and_upgrade_again(database_url: str, sync_engine: sa.Engine) -> None:
    upgrade_to_head(database_url)
    with sync_engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO models (model_id, model_dir, created_at, updated_at) "
                "VALUES ('a/b', '/x', '2025-01-01 00:00:00', '2025-01-01 00:00:00')"
            )
        )
    downgrade_to_base(database_url)
    assert _tables(sync_engine) == {"alembic_version"}
    assert _revision(sync_engine) is None

    upgrade_to_head(database_url)
    assert _tables(sync_engine) == TABLES | {"alembic_version"}
    with sync_engine.connect() as connection:  # a fresh schema: the old row went with it
        assert connection.execute(sa.text("SELECT COUNT(*) FROM models")).scalar_one() == 0


def test_head_matches_the_orm_models(database_url: str, sync_engine: sa.Engine) -> None:
    upgrade_to_head(database_url)
    with sync_engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []


def test_comparison_would_notice_a_missing_migration(
    database_url: str, sync_engine: sa.Engine
) -> None:
    # Guards the test above: an ORM column with no migration shows up as a difference.
    upgrade_to_head(database_url)
    metadata = sa.MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(metadata)
    metadata.tables["histories"].append_column(sa.Column("extra", sa.Integer()))
    with sync_engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
    assert [(op[0], op[3].name) for op in diff] == [("add_column", "extra")]


async def test_app_connections_use_wal_busy_timeout_and_foreign_keys(app: FastAPI) -> None:
    async with app.state.session_factory() as session:
        journal = (await session.execute(sa.text("PRAGMA journal_mode"))).scalar_one()
        busy = (await session.execute(sa.text("PRAGMA busy_timeout"))).scalar_one()
        foreign_keys = (await session.execute(sa.text("PRAGMA foreign_keys"))).scalar_one()
    assert journal == "wal"
    assert busy == BUSY_TIMEOUT_MS
    assert busy > 0
    assert foreign_keys == 1


async def test_app_database_is_migrated_at_start(app: FastAPI) -> None:
    async with app.state.session_factory() as session:
        rows = await session.execute(sa.text("SELECT name FROM sqlite_master WHERE type='table'"))
        names = {row[0] for row in rows}
        version = (
            await session.execute(sa.text("SELECT version_num FROM alembic_version"))
        ).scalar_one()
    assert names >= TABLES
    head = ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite://")).get_current_head()
    assert version == head


# ---------------------------------------------------------------------------------------------
# Each migration of the loras table, on LoRA rows added before it

_LORA_ROW = (
    "INSERT INTO loras (name, file_path, file_size, sha256, created_at, updated_at) "
    "VALUES (:name, '/x', 1, :name, '2025-01-01 00:00:00', '2025-01-01 00:00:00')"
)

LORA_MIGRATIONS = [
    pytest.param(
        "0003",
        ("format", "base_model", "trigger_words", "raw_metadata", "tensor_sha256"),
        id="0003-lora-details",
    ),
    pytest.param("0004", ("source_url", "civitai"), id="0004-download-source"),
]
"""A revision that changes the ``loras`` table, and (some of) the columns it adds: empty on
the rows that were there before it (a start-up describes them)."""


@pytest.mark.parametrize(("revision", "added"), LORA_MIGRATIONS)
def test_a_loras_migration_keeps_rows_and_downgrade_keeps_ids_unique(
    database_url: str, sync_engine: sa.Engine, revision: str, added: tuple[str, ...]
) -> None:
    config = alembic_config(database_url)
    previous = ScriptDirectory.from_config(config).get_revision(revision).down_revision
    assert isinstance(previous, str)
    command.upgrade(config, previous)
    with sync_engine.begin() as connection:
        for name in ("a", "b", "c"):
            connection.execute(sa.text(_LORA_ROW), {"name": name})
        connection.execute(sa.text("DELETE FROM loras WHERE name = 'c'"))

    command.upgrade(config, revision)
    with sync_engine.connect() as connection:
        rows = connection.execute(sa.text(f"SELECT id, {', '.join(added)} FROM loras")).all()
    empty = (None,) * len(added)
    assert [tuple(row) for row in rows] == [(1, *empty), (2, *empty)]

    command.downgrade(config, previous)
    assert not set(added) & _columns(sync_engine, "loras")
    with sync_engine.begin() as connection:
        table_sql = connection.execute(
            sa.text("SELECT sql FROM sqlite_master WHERE name = 'loras'")
        ).scalar_one()
        connection.execute(sa.text(_LORA_ROW), {"name": "d"})
        ids = connection.execute(sa.text("SELECT id FROM loras ORDER BY id")).scalars().all()
    assert "AUTOINCREMENT" in table_sql
    assert ids == [1, 2, 4]  # the deleted LoRA's id 3 is not handed out again
