"""A finished download enters the upload's path: hash check against what the service
promised, the same validation, then ``service.ingest`` (dedupe, place, row) in a session of
its own that commits once, with the same after-commit/after-rollback file work."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.database import hooks
from app.database.models import LoRA, LoRASource
from app.features.loras import file_manager, service
from app.features.loras.downloads.partial_file import Written
from app.features.loras.downloads.plan import Plan
from app.platform.remote_files import DownloadError
from app.platform.storage import Storage
from app.platform.worker_threads import in_thread


def check_hash(plan: Plan, written: Written, file_name: str) -> None:
    expected = plan.expected_sha256
    if expected is not None and written.sha256 != expected:
        raise DownloadError(
            f"The downloaded '{file_name}' does not match the SHA256 that "
            f"{plan.target.service or 'the source'} lists (expected {expected}, got "
            f"{written.sha256}); nothing was kept. Try again, or report the file."
        )


async def validate(plan: Plan, written: Written, file_name: str) -> file_manager.StagedLoRA:
    """The upload's validation and description (the temporary file is removed if refused);
    CivitAI's trained words are the trigger words of a file that names none."""
    return await in_thread(
        lambda: file_manager.validate_staged(
            written.path,
            file_name,
            written.sha256,
            written.tensor_sha256,
            written.size,
            trained_words=plan.trained_words,
        )
    )


def _origin(plan: Plan, file_name: str) -> service.Origin:
    stem = file_manager.safe_stem(file_name)
    source = LoRASource(source_url=plan.public_url, civitai=plan.civitai)
    return service.Origin(name=stem, file_stem=stem, location=plan.public_url, source=source)


async def ingest(
    session_factory: async_sessionmaker[AsyncSession],
    storage: Storage,
    plan: Plan,
    staged: file_manager.StagedLoRA,
    file_name: str,
) -> LoRA:
    async with hooks.transaction(session_factory) as session:
        return await service.ingest(session, storage, staged, _origin(plan, file_name))
