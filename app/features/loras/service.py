"""LoRA records: upload (copy + validate + dedupe), list, get, delete, start-up repair."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio.to_thread
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.cores.model_manager.model_manager import ModelManager
from app.database import crud, hooks
from app.database.models import LoRA
from app.exceptions import BadRequestError, ConflictError, NotFoundError
from app.features.loras import file_manager
from app.features.loras.schemas import LoRAConfigItem, LoRAInfo
from app.services.storage import Storage

logger = logging.getLogger(__name__)

_CREATE_ATTEMPTS = 3


@dataclass(frozen=True)
class LoRASelection:
    """A LoRA a generation asked for, with its weight and the file to load it from."""

    id: int
    name: str
    file_path: Path
    weight: float
    sha256: str

    @property
    def adapter_name(self) -> str:
        return f"lora_{self.id}"


def to_info(row: LoRA) -> LoRAInfo:
    return LoRAInfo(
        id=row.id,
        name=row.name,
        file_path=row.file_path,
        file_size=row.file_size,
        sha256=row.sha256,
        file_missing=not Path(row.file_path).is_file(),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _duplicate_message(row: LoRA) -> str:
    return f"This file is already added as LoRA '{row.name}' (id {row.id})."


async def _display_name(session: AsyncSession, stem: str) -> str:
    taken = await crud.lora_names_like(session, stem)
    if stem not in taken:
        return stem
    number = 2
    while f"{stem} ({number})" in taken:
        number += 1
    return f"{stem} ({number})"


async def upload_lora(
    session: AsyncSession, storage: Storage, settings: Settings, file_path: str
) -> LoRAInfo:
    source = file_manager.check_source(file_path, settings.lora_max_file_size)
    loras_dir = storage.get_loras_dir()
    staged = await anyio.to_thread.run_sync(
        file_manager.stage_copy, source, loras_dir, settings.lora_max_file_size
    )
    try:
        existing = await crud.get_lora_by_sha256(session, staged.sha256)
        if existing is not None:
            raise ConflictError(_duplicate_message(existing))
        stored = await anyio.to_thread.run_sync(
            file_manager.place, staged, loras_dir, file_manager.safe_stem(source.name)
        )
    finally:
        file_manager.discard(staged.temp_path)
    # From here the copy lives or dies with the row: removed if the transaction fails.
    hooks.after_rollback(session, partial(file_manager.discard, stored))
    row = await _create_row(session, source, str(stored.resolve()), staged)
    logger.info(
        "Added LoRA '%s' (id %d, %s, %s) from %s",
        row.name,
        row.id,
        staged.inspection.format,
        "+".join(staged.inspection.components),
        source,
    )
    return to_info(row)


async def _create_row(
    session: AsyncSession, source: Path, file_path: str, staged: file_manager.StagedLoRA
) -> LoRA:
    attempts = 0
    while True:
        attempts += 1
        try:
            return await crud.create_lora(
                session,
                name=await _display_name(session, source.stem),
                file_path=file_path,
                file_size=staged.size,
                sha256=staged.sha256,
                source_path=str(source),
            )
        except IntegrityError:
            # A concurrent request committed the same content (409), or took the same display
            # name (choose again); anything else is a real database fault (500).
            await session.rollback()
            raced = await crud.get_lora_by_sha256(session, staged.sha256)
            if raced is not None:
                raise ConflictError(_duplicate_message(raced)) from None
            if attempts >= _CREATE_ATTEMPTS:
                raise


async def list_loras(session: AsyncSession) -> list[LoRAInfo]:
    rows = await crud.list_loras(session)
    return await anyio.to_thread.run_sync(lambda: [to_info(row) for row in rows])


async def get_lora(session: AsyncSession, lora_id: int) -> LoRAInfo:
    row = await crud.get_lora(session, lora_id)
    if row is None:
        raise NotFoundError(f"LoRA with id {lora_id} not found")
    return to_info(row)


async def delete_lora(session: AsyncSession, models: ModelManager, lora_id: int) -> None:
    row = await crud.get_lora(session, lora_id)
    if row is None:
        raise NotFoundError(f"LoRA with id {lora_id} does not exist.")
    await crud.delete_lora(session, row)
    # A generation using it holds its own hard link (file_manager.pinned_copies).
    hooks.after_commit(session, partial(file_manager.discard, Path(row.file_path)))
    hooks.after_commit(session, partial(models.forget_lora, row.sha256))
    logger.info("Deleted LoRA '%s' (id %d)", row.name, row.id)


async def select_loras(
    session: AsyncSession, items: Sequence[LoRAConfigItem]
) -> list[LoRASelection]:
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
            LoRASelection(row.id, row.name, Path(row.file_path), item.weight, row.sha256)
        )
    return selections


async def repair_on_startup(session: AsyncSession, storage: Storage) -> None:
    """Remove files no row points to; report rows whose file is gone."""
    rows = await crud.list_loras(session)
    known = {Path(row.file_path) for row in rows}
    removed = await anyio.to_thread.run_sync(
        file_manager.remove_orphans, storage.get_loras_dir(), known
    )
    for path in removed:
        logger.info("Removed leftover LoRA file %s", path.name)
    for info in await anyio.to_thread.run_sync(lambda: [to_info(row) for row in rows]):
        if info.file_missing:
            logger.warning(
                "LoRA '%s' (id %d): its file %s is missing; delete it and add it again",
                info.name,
                info.id,
                info.file_path,
            )
