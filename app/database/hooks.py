"""File work tied to the fate of the request's transaction.

A file must disappear only once the row that points at it is gone for good, and a file
copied for a row that never got committed must not stay behind. Services register such
work here; :func:`transaction` (behind ``app.deps.get_session``, and used by background
work such as LoRA downloads) runs it after the one commit or rollback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.exceptions import AppError

logger = logging.getLogger(__name__)

Action = Callable[[], None]
_AFTER_COMMIT = "after_commit"
_AFTER_ROLLBACK = "after_rollback"


def after_commit(session: AsyncSession, action: Action) -> None:
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


def after_rollback(session: AsyncSession, action: Action) -> None:
    session.info.setdefault(_AFTER_ROLLBACK, []).append(action)


def _run(session: AsyncSession, key: str) -> None:
    actions: list[Action] = session.info.pop(key, [])
    session.info.pop(_AFTER_ROLLBACK if key == _AFTER_COMMIT else _AFTER_COMMIT, None)
    for action in actions:
        try:
            action()
        except Exception:  # one failed clean-up must not hide the others
            logger.exception("Clean-up after %s failed", key)


def run_after_commit(session: AsyncSession) -> None:
    _run(session, _AFTER_COMMIT)


def run_after_rollback(session: AsyncSession) -> None:
    _run(session, _AFTER_ROLLBACK)


@asynccontextmanager
async def transaction(
    session_factory: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One session, committed once when the block ends, rolled back if anything raised (a
    cancellation too) except an ``AppError`` that ``keeps_changes``; then the registered file
    work for that outcome runs."""
    async with session_factory() as session:
        try:
            yield session
        except AppError as error:
            if not error.keeps_changes:
                await _roll_back(session)
                raise
            await session.commit()
            run_after_commit(session)
            raise
        except BaseException:
            await _roll_back(session)
            raise
        try:
            await session.commit()
        except BaseException:
            await _roll_back(session)
            raise
        run_after_commit(session)


async def _roll_back(session: AsyncSession) -> None:
    await session.rollback()
    run_after_rollback(session)
