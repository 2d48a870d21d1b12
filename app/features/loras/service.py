"""LoRA records: upload (copy + validate + describe + dedupe) and the ingest step it shares
with downloads, list, get, delete, start-up repair; which LoRAs fit the loaded model.
Functions return rows (``LoRA``); the API makes its responses of them (``LoRAInfo.of``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio.to_thread
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.cores.lora_engine import LoRARequest
from app.cores.lora_files.metadata import clean_text
from app.cores.model_manager.model_family import ModelFamily, is_compatible
from app.database import crud, hooks
from app.database.models import LoRA, LoRASource
from app.exceptions import BadRequestError, ConflictError, NotFoundError
from app.features.loras import file_manager
from app.features.loras.schemas import LoRAConfigItem
from app.platform.storage import Storage

logger = logging.getLogger(__name__)

_CREATE_ATTEMPTS = 3

ForgetLoRA = Callable[[str], None]
"""Tells the engine to drop what it cached of a LoRA file, by its sha256
(``ModelManager.forget_lora``)."""


def duplicate_message(row: LoRA) -> str:
    return f"This file is already added as LoRA '{row.name}' (id {row.id})."


MAX_NAME_CHARS = 200
"""Display names (the ``name`` column holds 255) leave room for a `` (NN)`` suffix."""


async def _display_name(session: AsyncSession, stem: str) -> str:
    # A file name can hide direction overrides (U+202E) and control characters as well as
    # metadata can: the same cleaning applies.
    stem = clean_text(stem, MAX_NAME_CHARS)[0].strip() or "LoRA"
    taken = await crud.lora_names_like(session, stem)
    if stem not in taken:
        return stem
    number = 2
    while f"{stem} ({number})" in taken:
        number += 1
    return f"{stem} ({number})"


@dataclass(frozen=True)
class Origin:
    """Where a staged LoRA came from: its display name (before de-duplication), the stem of
    its stored file, and what the row records about the source."""

    name: str
    file_stem: str
    location: str
    """The user's path or the URL, for the log."""
    source_path: str | None = None
    """An upload's path on the user's machine."""
    source: LoRASource | None = None
    """Where a download came from."""


async def upload_lora(
    session: AsyncSession, storage: Storage, settings: Settings, file_path: str
) -> LoRA:
    source = file_manager.check_source(file_path, settings.lora_max_file_size)
    staged = await anyio.to_thread.run_sync(
        file_manager.stage_copy, source, storage.get_loras_dir(), settings.lora_max_file_size
    )
    origin = Origin(
        name=source.stem,
        file_stem=file_manager.safe_stem(source.name),
        location=str(source),
        source_path=str(source),
    )
    return await ingest(session, storage, staged, origin)


async def ingest(
    session: AsyncSession, storage: Storage, staged: file_manager.StagedLoRA, origin: Origin
) -> LoRA:
    """The one way in for a validated file (an upload's copy or a download): dedupe by
    sha256 (409), give it its final name, add its row. The temporary file is gone afterwards;
    the final one is removed again if the session's transaction does not commit."""
    loras_dir = storage.get_loras_dir()
    try:
        existing = await crud.get_lora_by_sha256(session, staged.sha256)
        if existing is not None:
            raise ConflictError(duplicate_message(existing))
        stored = await anyio.to_thread.run_sync(
            file_manager.place, staged, loras_dir, origin.file_stem
        )
    finally:
        file_manager.discard(staged.temp_path)
    # From here the copy lives or dies with the row: removed if the transaction fails.
    hooks.after_rollback(session, partial(file_manager.discard, stored))
    row = await _create_row(session, origin, str(stored.resolve()), staged)
    facts = staged.facts
    logger.info(
        "Added LoRA '%s' (id %d, %s %s, %s, for %s) from %s",
        row.name,
        row.id,
        facts.format,
        facts.network_type,
        "+".join(facts.components),
        facts.base_model,
        origin.location,
    )
    if facts.base_model_note:
        logger.info("LoRA '%s': %s", row.name, facts.base_model_note)
    return row


async def _create_row(
    session: AsyncSession, origin: Origin, file_path: str, staged: file_manager.StagedLoRA
) -> LoRA:
    """Insert the row under the first free display name (``same``, ``same (2)``...).

    Concurrent requests may pick the same name: the insert then adds nothing and the name is
    chosen again. After the first attempt this transaction holds SQLite's write lock, so the
    second attempt sees every committed name and cannot lose again.
    """
    for _ in range(_CREATE_ATTEMPTS):
        row = await crud.create_lora(
            session,
            name=await _display_name(session, origin.name),
            file_path=file_path,
            file_size=staged.size,
            sha256=staged.sha256,
            source_path=origin.source_path,
            facts=staged.facts,
            source=origin.source,
        )
        if row is not None:
            return row
        raced = await crud.get_lora_by_sha256(session, staged.sha256)
        if raced is not None:  # a concurrent request committed the same content first
            raise ConflictError(duplicate_message(raced))
    raise RuntimeError(f"no free display name for LoRA '{origin.name}'")


def base_model_of(row: LoRA) -> str | None:
    """The family the LoRA was made for (``ModelFamily`` value); None before it is described."""
    return row.facts.base_model if row.facts is not None else None


async def list_loras(
    session: AsyncSession, family: ModelFamily | None, compatible_with_loaded: bool | None = None
) -> Sequence[LoRA]:
    """Every LoRA, oldest first; ``compatible_with_loaded=True`` leaves out those known to be
    made for another family than the loaded model's (``family``; LoRAs of unknown family
    stay: they may fit, and the size check at generation decides), ``False`` keeps only
    those. With no model loaded, or one of unknown family, nothing is known to be
    incompatible."""
    rows = await crud.list_loras(session)
    if compatible_with_loaded is None:
        return rows
    if family is None or not family.known:
        return rows if compatible_with_loaded else []
    return [
        row
        for row in rows
        if (is_compatible(base_model_of(row), family) is not False) == compatible_with_loaded
    ]


async def get_lora(session: AsyncSession, lora_id: int) -> LoRA:
    row = await crud.get_lora(session, lora_id)
    if row is None:
        raise NotFoundError(f"LoRA with id {lora_id} not found")
    return row


async def delete_lora(session: AsyncSession, lora_id: int, forget: ForgetLoRA) -> None:
    """Delete the row; once that is committed, the file, and what the engine cached of it
    (``forget``)."""
    row = await crud.get_lora(session, lora_id)
    if row is None:
        raise NotFoundError(f"LoRA with id {lora_id} does not exist.")
    await crud.delete_lora(session, row)
    # A generation using it holds its own hard link (file_manager.pinned_copies).
    hooks.after_commit(session, partial(file_manager.discard, Path(row.file_path)))
    hooks.after_commit(session, partial(forget, row.sha256))
    logger.info("Deleted LoRA '%s' (id %d)", row.name, row.id)


async def select_loras(session: AsyncSession, items: Sequence[LoRAConfigItem]) -> list[LoRARequest]:
    """The LoRAs a generation asked for, in request order; 400 for unknown ids."""
    if not items:
        return []
    rows = await crud.get_loras(session, [item.lora_id for item in items])
    selections = []
    for item in items:
        row = rows.get(item.lora_id)
        if row is None:
            raise BadRequestError(f"LoRA with id {item.lora_id} not found")
        selections.append(
            LoRARequest(
                id=row.id,
                name=row.name,
                path=Path(row.file_path),
                content_key=row.sha256,
                weight=item.weight,
                base_model=base_model_of(row),
                tensor_sha256=row.facts.tensor_sha256 if row.facts is not None else None,
                unet_weight=item.unet_weight,
                text_encoder_weight=item.text_encoder_weight,
            )
        )
    return selections


async def repair_on_startup(session: AsyncSession, storage: Storage) -> None:
    """Remove files no row points to; report rows whose file is gone; describe rows added
    before LoRA facts were stored (one read of each such file, once)."""
    rows = await crud.list_loras(session)
    known = {Path(row.file_path) for row in rows}
    removed = await anyio.to_thread.run_sync(
        file_manager.remove_orphans, storage.get_loras_dir(), known
    )
    for path in removed:
        logger.info("Removed leftover LoRA file %s", path.name)
    missing = await anyio.to_thread.run_sync(
        lambda: [row for row in rows if not Path(row.file_path).is_file()]
    )
    for row in missing:
        logger.warning(
            "LoRA '%s' (id %d): its file %s is missing; delete it and add it again",
            row.name,
            row.id,
            row.file_path,
        )
    await _describe_old_rows(session)


async def _describe_old_rows(session: AsyncSession) -> None:
    for row in await crud.loras_without_facts(session):
        path = Path(row.file_path)
        if not await anyio.to_thread.run_sync(path.is_file):
            continue  # reported above
        facts = await anyio.to_thread.run_sync(file_manager.describe_stored, path)
        if facts is not None:
            await crud.set_lora_facts(session, row, facts)
            logger.info("Described LoRA '%s' (id %d): for %s", row.name, row.id, facts.base_model)
