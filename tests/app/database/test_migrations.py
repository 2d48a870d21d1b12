"""Alembic migrations and the SQLite connection settings, on real database files: the whole
chain, and each migration of the ``loras`` table on rows written before it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi import FastAPI

from alembic import command
from app.database.migrations import alembic_config, downgrade_to_base, sync_url, upgrade_to_head
from app.database.models import Base, LoRAFacts, LoRASource
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
    pytest.param("0005", ("facts", "source"), id="0005-facts-and-source-as-json"),
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


# ---------------------------------------------------------------------------------------------
# 0005 moves the facts and the source of described rows into one JSON column each, and back

_DESCRIBED: dict[str, Any] = {
    "format": "kohya",
    "components": ["unet", "text_encoder"],
    "network_type": "locon",
    "rank": 4,
    "rank_max": 8,
    "alpha": 0.1,
    "base_model": "sd1",
    "base_model_evidence": "768-wide cross-attention",
    "base_model_metadata": "sdxl",
    "base_model_metadata_source": "ss_base_model_version: sdxl_base_v1-0",
    "base_model_conflict": True,
    "base_model_note": "The metadata says SDXL.",
    "trigger_words": ["zkz style", "1girl"],
    "title": "A title",
    "description": "Über alles",
    "author": "me",
    "raw_metadata": {"ss_network_dim": "4", "modelspec.title": "A title"},
    "metadata_truncated": False,
    "tensor_sha256": "ab" * 32,
}
"""A row as 0003 and 0004 stored a described upload."""
_JSON_COLUMNS = {"components", "trigger_words", "raw_metadata", "civitai"}
_CIVITAI = {"version_id": 4321, "model_id": 77, "trained_words": ["boat"]}


def _set_columns(connection: sa.Connection, name: str, values: dict[str, Any]) -> None:
    assignments = ", ".join(f"{column} = :{column}" for column in values)
    encoded = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()}
    connection.execute(
        sa.text(f"UPDATE loras SET {assignments} WHERE name = :name"), {**encoded, "name": name}
    )


def _old_columns(connection: sa.Connection) -> list[dict[str, Any]]:
    columns = [*_DESCRIBED, "source_url", "civitai"]
    rows = connection.execute(sa.text(f"SELECT {', '.join(columns)} FROM loras ORDER BY id"))
    return [dict(row._mapping) for row in rows]


def test_0005_moves_the_columns_into_facts_and_source_and_back(
    database_url: str, sync_engine: sa.Engine
) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0004")
    with sync_engine.begin() as connection:
        for name in ("upload", "download", "old"):
            connection.execute(sa.text(_LORA_ROW), {"name": name})
        _set_columns(connection, "upload", _DESCRIBED)
        download = {**_DESCRIBED, "trigger_words": None, "raw_metadata": None}
        download |= {"base_model_conflict": None, "source_url": "https://x/y"}
        _set_columns(connection, "download", {**download, "civitai": _CIVITAI})
        before = _old_columns(connection)

    command.upgrade(config, "0005")
    with sync_engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT facts, source FROM loras ORDER BY id")).all()
    (upload, no_source), (download_facts, source), old = rows
    assert no_source is None
    assert tuple(old) == (None, None)  # never described: SQL NULL, described at the next start
    facts = LoRAFacts.model_validate_json(upload)
    assert facts.metadata == _DESCRIBED["raw_metadata"]
    assert facts.components == ("unet", "text_encoder")
    assert (facts.alpha, facts.base_model_conflict) == (0.1, True)
    facts = LoRAFacts.model_validate_json(download_facts)
    # NULLs of a described row become what the API showed for them.
    assert (facts.trigger_words, facts.metadata, facts.base_model_conflict) == ((), {}, False)
    assert LoRASource.model_validate_json(source) == LoRASource(
        source_url="https://x/y", civitai=_CIVITAI
    )

    command.downgrade(config, "0004")
    with sync_engine.connect() as connection:
        after = _old_columns(connection)
    assert (after[0], after[2]) == (before[0], before[2])
    assert after[1] == {
        **before[1],
        "trigger_words": "[]",
        "raw_metadata": "{}",
        "base_model_conflict": 0,
    }


# ---------------------------------------------------------------------------------------------
# 0006 says where each model came from and remembers file hashes (imported models)

_MODEL_ROW = (
    "INSERT INTO models (model_id, model_dir, created_at, updated_at) "
    "VALUES (:model_id, '/x', '2025-01-01 00:00:00', '2025-01-01 00:00:00')"
)
_ADDED_TO_MODELS = ("source", "family", "variant", "size", "sha256", "config")


def test_0006_keeps_the_models_as_downloads_and_downgrade_keeps_them(
    database_url: str, sync_engine: sa.Engine
) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0005")
    with sync_engine.begin() as connection:
        for model_id in ("a/b", "c/d"):
            connection.execute(sa.text(_MODEL_ROW), {"model_id": model_id})

    command.upgrade(config, "0006")
    assert "file_hashes" in _tables(sync_engine)
    with sync_engine.begin() as connection:
        rows = connection.execute(
            sa.text(f"SELECT model_id, {', '.join(_ADDED_TO_MODELS)} FROM models ORDER BY id")
        ).all()
        assert [tuple(row) for row in rows] == [
            ("a/b", "hub", None, None, None, None, None),
            ("c/d", "hub", None, None, None, None, None),
        ]
        connection.execute(sa.text(_MODEL_ROW), {"model_id": "e"})  # the default applies
        assert (
            connection.execute(
                sa.text("SELECT source FROM models WHERE model_id = 'e'")
            ).scalar_one()
            == "hub"
        )

    command.downgrade(config, "0005")
    assert "file_hashes" not in _tables(sync_engine)
    assert not set(_ADDED_TO_MODELS) & _columns(sync_engine, "models")
    with sync_engine.connect() as connection:
        ids = connection.execute(sa.text("SELECT model_id FROM models ORDER BY id")).scalars()
        assert list(ids) == ["a/b", "c/d", "e"]
