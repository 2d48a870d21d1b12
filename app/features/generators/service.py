"""Generation: run the pipeline, save the PNGs, link them to the history entry."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator
from dataclasses import replace
from functools import partial

import anyio.to_thread
import torch
from sqlalchemy.ext.asyncio import AsyncSession

from app.cores.lora_engine import LoRARequest
from app.cores.model_manager.memory import MemoryShares
from app.cores.model_manager.model_manager import ModelManager
from app.cores.model_manager.pipeline_manager import GenerationOutput
from app.database import crud, hooks
from app.database.models import History
from app.exceptions import AppError, BadRequestError, NotFoundError
from app.features.config.service import read_user_config
from app.features.config.upscalers import PIL_RESAMPLING
from app.features.generators.infotext import build_infotext, png_info
from app.features.generators.runner import (
    PHASE_COMPLETED,
    PHASE_IMAGE_GENERATION,
    GenerationPlan,
    GenerationRun,
    run_generation,
)
from app.features.generators.samplers import SamplerInfo, list_samplers
from app.features.generators.schemas import (
    GeneratedItem,
    GenerateRequest,
    GenerateResponse,
    GeneratorConfig,
)
from app.features.loras import file_manager
from app.features.loras import service as loras_service
from app.platform.disk_space import disk_full_error, is_disk_full
from app.platform.events import EventEmitter
from app.platform.socket_events import GenerationPhase
from app.platform.storage import Storage

logger = logging.getLogger(__name__)


class GenerationError(BadRequestError):
    """Diffusers refused or failed the run (the contract reports these as 400)."""


def samplers() -> list[SamplerInfo]:
    return list_samplers()


def _check_supported(config: GeneratorConfig) -> None:
    hires = config.hires_fix
    if hires is not None and hires.upscaler not in PIL_RESAMPLING:
        raise BadRequestError(
            f"The AI upscaler {hires.upscaler.value} is not installed; "
            "choose Lanczos, Bicubic, Bilinear or Nearest."
        )


def _memory_shares(storage: Storage) -> MemoryShares:
    user = read_user_config(storage)
    return MemoryShares(gpu=user.gpu_scale_factor, ram=user.ram_scale_factor)


def _seeds(config: GeneratorConfig) -> list[int]:
    base = config.seed if config.seed >= 0 else secrets.randbelow(2**32)
    return [(base + index) % 2**32 for index in range(config.number_of_images)]


def _save_images(
    storage: Storage,
    plan: GenerationPlan,
    model: str,
    model_hash: str | None,
    output: GenerationOutput,
) -> list[GeneratedItem]:
    items: list[GeneratedItem] = []
    try:
        for index, (image, seed) in enumerate(zip(output.images, plan.seeds, strict=True)):
            name = storage.new_image_name(index)
            text = build_infotext(
                plan.config,
                seed,
                model,
                image.width,
                image.height,
                model_hash=model_hash,
                loras=plan.loras,
            )
            path = storage.save_png(image, name, png_info(text))
            items.append(GeneratedItem(path=path, file_name=name))
    except BaseException:
        for item in items:
            storage.delete_generated_image(item.path)
        raise
    return items


@contextlib.contextmanager
def _pinned(storage: Storage, selections: list[LoRARequest]) -> Iterator[tuple[LoRARequest, ...]]:
    """Hard links to the LoRA files, so that deleting a LoRA cannot break this generation."""
    try:
        with file_manager.pinned_copies(
            storage.get_loras_dir(), [s.path for s in selections]
        ) as paths:
            yield tuple(
                replace(selection, path=path)
                for selection, path in zip(selections, paths, strict=True)
            )
    except FileNotFoundError as error:
        missing = next((s for s in selections if not s.path.is_file()), None)
        name = f"'{missing.name}' (id {missing.id})" if missing else "a requested LoRA"
        raise BadRequestError(
            f"The file of LoRA {name} is missing; delete the LoRA and add it again."
        ) from error
    except OSError as error:
        if is_disk_full(error):  # a file system without hard links copies them
            raise disk_full_error("the LoRA files in use", storage.loras_dir) from error
        raise


async def _run(models: ModelManager, events: EventEmitter, plan: GenerationPlan) -> GenerationRun:
    events.emit(GenerationPhase(plan.phases, PHASE_IMAGE_GENERATION))
    try:
        return await models.run(partial(run_generation, plan=plan, events=events))
    except AppError:
        raise
    except torch.OutOfMemoryError as error:
        raise GenerationError(
            "Out of memory while generating. Try fewer or smaller images."
        ) from error
    except Exception as error:  # diffusers raises many kinds; each is this request's failure
        logger.exception("Generation failed")
        raise GenerationError(f"Generation failed ({type(error).__name__}): {error}") from error
    finally:
        events.emit(GenerationPhase(plan.phases, PHASE_COMPLETED))


async def generate(
    session: AsyncSession,
    models: ModelManager,
    storage: Storage,
    events: EventEmitter,
    request: GenerateRequest,
) -> GenerateResponse:
    history = await crud.get_history(session, request.history_id)
    if history is None:
        raise NotFoundError(f"History {request.history_id} not found")
    try:
        return await _generate_into(session, models, storage, events, history, request.config)
    except AppError as error:
        # The UI made this entry for this run; with no image it would look like a run whose
        # images went missing. It goes, and the error says why the run failed.
        if not history.generated_images:
            await crud.delete_history(session, history)
            error.keeps_changes = True
        raise


async def _generate_into(
    session: AsyncSession,
    models: ModelManager,
    storage: Storage,
    events: EventEmitter,
    history: History,
    config: GeneratorConfig,
) -> GenerateResponse:
    _check_supported(config)
    selections = await loras_service.select_loras(session, config.loras)
    with _pinned(storage, selections) as loras:
        plan = GenerationPlan(config, _seeds(config), _memory_shares(storage), loras)
        run = await _run(models, events, plan)
    output = run.output
    items = await anyio.to_thread.run_sync(
        _save_images, storage, plan, run.model_id, run.model_hash, output
    )
    for item in items:
        hooks.after_rollback(session, partial(storage.delete_generated_image, item.path))
    await crud.add_images(
        session,
        history.id,
        [
            (i.path, i.file_name, nsfw, seed)
            for i, nsfw, seed in zip(items, output.nsfw, plan.seeds, strict=True)
        ],
    )
    return GenerateResponse(items=items, nsfw_content_detected=output.nsfw, seeds=plan.seeds)
