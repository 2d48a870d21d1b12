"""Imported models: where a model came from, its family, size and content hash, and a cache
of file hashes

``models`` gains ``source`` (``hub`` for the rows already there; the embedded model's row says
``embedded`` from the next start), ``family``, ``variant``, ``size``, ``sha256`` (indexed, NULL
for downloads) and ``config``; ``file_hashes`` remembers a file's sha256 by path, size and
modification time.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-09 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(
            sa.Column("source", sa.String(length=16), nullable=False, server_default="hub")
        )
        batch.add_column(sa.Column("family", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("variant", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("size", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("config", sa.Text(), nullable=True))
        batch.create_index(batch.f("ix_models_sha256"), ["sha256"], unique=False)
    op.create_table(
        "file_hashes",
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("mtime_ns", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("path"),
    )


def downgrade() -> None:
    op.drop_table("file_hashes")
    with op.batch_alter_table("models") as batch:
        batch.drop_index(batch.f("ix_models_sha256"))
        for column in ("config", "sha256", "size", "variant", "family", "source"):
            batch.drop_column(column)
