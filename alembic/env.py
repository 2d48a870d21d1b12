"""Alembic environment. Migrations run on a plain (sync) SQLite connection."""

from __future__ import annotations

from sqlalchemy import create_engine

from alembic import context
from app.config import get_settings
from app.database.migrations import sync_url
from app.database.models import Base

config = context.config
url = config.attributes.get("database_url") or get_settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(url=sync_url(url), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(sync_url(url))
    with engine.connect() as connection:
        # batch mode: SQLite cannot ALTER most things in place.
        context.configure(
            connection=connection, target_metadata=Base.metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
