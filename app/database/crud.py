"""All SQL lives here. Functions add and flush; the request's session commits once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.database.models import (
    DownloadedModel,
    FileHash,
    GeneratedImage,
    History,
    LoRA,
    LoRAFacts,
    LoRASource,
)

# --- models -----------------------------------------------------------------------------


async def list_models(session: AsyncSession) -> Sequence[DownloadedModel]:
    result = await session.scalars(select(DownloadedModel).order_by(DownloadedModel.id))
    return result.all()


async def get_model(session: AsyncSession, model_id: str) -> DownloadedModel | None:
    return await session.scalar(select(DownloadedModel).where(DownloadedModel.model_id == model_id))


async def upsert_model(
    session: AsyncSession, model_id: str, model_dir: str, source: str = "hub"
) -> DownloadedModel:
    row = await get_model(session, model_id)
    if row is None:
        row = DownloadedModel(model_id=model_id, model_dir=model_dir, source=source)
        session.add(row)
    else:
        if row.model_dir != model_dir:
            row.model_dir = model_dir
        if row.source != source:
            row.source = source
    await session.flush()
    return row


async def get_model_by_sha256(session: AsyncSession, sha256: str) -> DownloadedModel | None:
    return await session.scalar(
        select(DownloadedModel).where(DownloadedModel.sha256 == sha256).limit(1)
    )


async def create_imported_model(
    session: AsyncSession,
    *,
    model_id: str,
    model_dir: str,
    family: str,
    variant: str | None,
    size: int,
    sha256: str,
    config: str | None,
) -> DownloadedModel | None:
    """Add an imported model's row, or nothing (None) when ``model_id`` is taken (see
    ``create_lora`` for why not an ORM flush)."""
    statement = (
        sqlite_insert(DownloadedModel)
        .values(
            {
                DownloadedModel.model_id: model_id,
                DownloadedModel.model_dir: model_dir,
                DownloadedModel.source: "import",
                DownloadedModel.family: family,
                DownloadedModel.variant: variant,
                DownloadedModel.size: size,
                DownloadedModel.sha256: sha256,
                DownloadedModel.config: config,
            }
        )
        .on_conflict_do_nothing()
        .returning(DownloadedModel.id)
    )
    new_id = (await session.execute(statement)).scalar_one_or_none()
    return None if new_id is None else await session.get(DownloadedModel, new_id)


async def delete_model(session: AsyncSession, row: DownloadedModel) -> None:
    await session.delete(row)
    await session.flush()


# --- file hashes ------------------------------------------------------------------------


async def cached_file_hash(
    session: AsyncSession, path: str, size: int, mtime_ns: int
) -> str | None:
    """The sha256 remembered for the file at ``path`` when its size and mtime still match."""
    row = await session.get(FileHash, path)
    if row is None or row.size != size or row.mtime_ns != mtime_ns:
        return None
    return row.sha256


async def remember_file_hash(
    session: AsyncSession, path: str, size: int, mtime_ns: int, sha256: str
) -> None:
    statement = sqlite_insert(FileHash).values(
        path=path, size=size, mtime_ns=mtime_ns, sha256=sha256
    )
    statement = statement.on_conflict_do_update(
        index_elements=[FileHash.path],
        set_={"size": size, "mtime_ns": mtime_ns, "sha256": sha256},
    )
    await session.execute(statement)


# --- histories and images ---------------------------------------------------------------


async def create_history(
    session: AsyncSession, prompt: str, model: str, config: dict[str, Any]
) -> History:
    history = History(prompt=prompt, model=model, config=config)
    session.add(history)
    await session.flush()
    await session.refresh(history, ["generated_images"])
    return history


async def list_histories(session: AsyncSession) -> Sequence[History]:
    result = await session.scalars(select(History).order_by(History.id))
    return result.all()


async def get_history(session: AsyncSession, history_id: int) -> History | None:
    return await session.get(History, history_id)


async def delete_history(session: AsyncSession, history: History) -> None:
    await session.delete(history)
    await session.flush()


async def add_images(
    session: AsyncSession, history_id: int, images: Sequence[tuple[str, str, bool, int]]
) -> list[GeneratedImage]:
    """Rows for (path, file_name, is_nsfw, seed) tuples, in order."""
    rows = [
        GeneratedImage(history_id=history_id, path=path, file_name=name, is_nsfw=nsfw, seed=seed)
        for path, name, nsfw, seed in images
    ]
    session.add_all(rows)
    await session.flush()
    return rows


async def image_file_names(session: AsyncSession) -> set[str]:
    """The file name (``<name>.png``) of every recorded image."""
    result = await session.scalars(select(GeneratedImage.path))
    return {path.rsplit("/", 1)[-1] for path in result.all()}


# --- LoRAs ------------------------------------------------------------------------------


async def list_loras(session: AsyncSession) -> Sequence[LoRA]:
    result = await session.scalars(select(LoRA).order_by(LoRA.id))
    return result.all()


async def loras_without_facts(session: AsyncSession) -> Sequence[LoRA]:
    """Rows added before LoRAs were described (migration 0003)."""
    result = await session.scalars(select(LoRA).where(LoRA.facts.is_(None)).order_by(LoRA.id))
    return result.all()


async def set_lora_facts(session: AsyncSession, row: LoRA, facts: LoRAFacts) -> None:
    row.facts = facts
    await session.flush()


async def get_lora(session: AsyncSession, lora_id: int) -> LoRA | None:
    return await session.get(LoRA, lora_id)


async def get_loras(session: AsyncSession, lora_ids: Sequence[int]) -> dict[int, LoRA]:
    result = await session.scalars(select(LoRA).where(LoRA.id.in_(lora_ids)))
    return {row.id: row for row in result.all()}


async def get_lora_by_sha256(session: AsyncSession, sha256: str) -> LoRA | None:
    return await session.scalar(select(LoRA).where(LoRA.sha256 == sha256))


async def lora_names_like(session: AsyncSession, stem: str) -> set[str]:
    result = await session.scalars(select(LoRA.name).where(LoRA.name.startswith(stem)))
    return set(result.all())


async def create_lora(
    session: AsyncSession,
    *,
    name: str,
    file_path: str,
    file_size: int,
    sha256: str,
    source_path: str | None,
    facts: LoRAFacts,
    source: LoRASource | None,
) -> LoRA | None:
    """Add a LoRA row, or nothing (None) when its name or sha256 is taken.

    ``INSERT ... ON CONFLICT DO NOTHING`` instead of an ORM flush: a lost race on a unique
    column must not fail the request's transaction (a failed flush can only be rolled back,
    and only the request's owner ends its transaction). The statement takes SQLite's write
    lock, so whatever the caller reads afterwards in this transaction is current. (Not a
    savepoint either: with the driver's default transaction handling a SAVEPOINT taken before
    the transaction's first write begins SQLite's transaction itself, and its RELEASE then
    commits everything.)
    """
    statement = (
        sqlite_insert(LoRA)
        .values(
            {
                LoRA.name: name,
                LoRA.file_path: file_path,
                LoRA.file_size: file_size,
                LoRA.sha256: sha256,
                LoRA.source_path: source_path,
                LoRA.facts: facts,
                LoRA.source: source,
            }
        )
        .on_conflict_do_nothing()
        .returning(LoRA.id)
    )
    new_id = (await session.execute(statement)).scalar_one_or_none()
    return None if new_id is None else await session.get(LoRA, new_id)


async def delete_lora(session: AsyncSession, row: LoRA) -> None:
    await session.delete(row)
    await session.flush()
