"""The blocking part of a generation: runs in a worker thread with the pipeline lock held."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from app.cores.lora_engine import LoRARequest
from app.cores.model_manager.memory import GiB, ImagePass, MemoryPlan, MemoryShares
from app.cores.model_manager.pipeline_manager import (
    DiffusionParams,
    GenerationOutput,
    PipelineManager,
)
from app.exceptions import BadRequestError
from app.features.config.upscalers import PIL_RESAMPLING
from app.features.generators.previews import latents_to_preview_pngs, preview_for
from app.features.generators.samplers import make_scheduler
from app.features.generators.schemas import GeneratorConfig
from app.platform.events import EventEmitter
from app.platform.socket_events import GenerationPhase, ImageGenerationStepEnd

PHASE_IMAGE_GENERATION = "image_generation"
PHASE_UPSCALING = "upscaling"
PHASE_COMPLETED = "completed"


def round_to_latent_grid(size: int) -> int:
    """Round down to a multiple of 8, the VAE's scale factor."""
    return max(64, size - size % 8)


class MemoryLimitError(BadRequestError):
    """The request needs more memory than the user lets the backend use."""


@dataclass(frozen=True)
class GenerationPlan:
    config: GeneratorConfig
    seeds: list[int]
    memory: MemoryShares
    loras: tuple[LoRARequest, ...] = ()

    @property
    def phases(self) -> list[str]:
        if self.config.hires_fix is None:
            return [PHASE_IMAGE_GENERATION]
        return [PHASE_IMAGE_GENERATION, PHASE_UPSCALING]


def _params(pipeline: PipelineManager, plan: GenerationPlan, steps: int) -> DiffusionParams:
    config = plan.config
    return DiffusionParams(
        prompt=config.prompt,
        negative_prompt=config.negative_prompt,
        steps=steps,
        cfg_scale=config.cfg_scale,
        clip_skip=config.clip_skip,
        seeds=plan.seeds,
        # A fresh scheduler per pass: schedulers keep per-run state.
        scheduler=make_scheduler(config.sampler, pipeline.scheduler_config, noise_seed=plan.seeds),
    )


def _hires_pass(
    pipeline: PipelineManager, plan: GenerationPlan, base: GenerationOutput
) -> GenerationOutput:
    hires = plan.config.hires_fix
    assert hires is not None
    resample = PIL_RESAMPLING[hires.upscaler]
    upscaled = [
        image.resize(
            (
                round_to_latent_grid(round(image.width * hires.upscale_factor)),
                round_to_latent_grid(round(image.height * hires.upscale_factor)),
            ),
            resample,
        )
        for image in base.images
    ]
    # Images the safety check flagged are only resized: no detail is added to them.
    refine = [i for i, flagged in enumerate(base.nsfw) if not flagged]
    if hires.denoising_strength == 0 or not refine:
        return GenerationOutput(images=upscaled, nsfw=base.nsfw)
    subset = replace(plan, seeds=[plan.seeds[i] for i in refine])
    # img2img runs int(steps * strength) steps; a small strength must still run one.
    steps = max(hires.steps or plan.config.steps, math.ceil(1 / hires.denoising_strength))
    params = _params(pipeline, subset, steps)
    refined = pipeline.image_to_image(
        params, [upscaled[i] for i in refine], hires.denoising_strength
    )
    images, nsfw = list(upscaled), list(base.nsfw)
    for position, index in enumerate(refine):
        images[index] = refined.images[position]
        nsfw[index] = refined.nsfw[position]
    return GenerationOutput(images=images, nsfw=nsfw)


@dataclass(frozen=True)
class GenerationRun:
    """The images, and which model made them (read under the pipeline lock)."""

    output: GenerationOutput
    model_id: str
    model_hash: str | None


def _passes(plan: GenerationPlan) -> list[ImagePass]:
    config = plan.config
    width, height = round_to_latent_grid(config.width), round_to_latent_grid(config.height)
    passes = [ImagePass(width, height, len(plan.seeds))]
    if config.hires_fix is not None:
        factor = config.hires_fix.upscale_factor
        passes.append(
            ImagePass(
                round_to_latent_grid(round(width * factor)),
                round_to_latent_grid(round(height * factor)),
                len(plan.seeds),
            )
        )
    return passes


def check_memory(pipeline: PipelineManager, plan: GenerationPlan) -> MemoryPlan:
    """Refuse, before anything runs, a request that cannot fit in the user's memory share."""
    passes = _passes(plan)
    memory = pipeline.memory_plan(passes, plan.memory)
    if memory.fits:
        return memory
    budget = memory.budget
    base, *hires = passes
    what = f"{base.batch} image{'s' if base.batch > 1 else ''} of {base.width}x{base.height}"
    if hires:
        what += f", upscaled to {hires[0].width}x{hires[0].height}"
    raise MemoryLimitError(
        f"This request needs about {memory.estimate / GiB:.1f} GiB of working memory "
        f"({what}), more than the {budget.limit / GiB:.1f} GiB the backend may use: "
        f"{budget.explain()}. "
        "Ask for fewer or smaller images, or raise the memory share in the settings."
    )


def run_generation(
    pipeline: PipelineManager, plan: GenerationPlan, events: EventEmitter
) -> GenerationRun:
    """Generate with the plan's LoRAs applied; the base weights are back whatever happens."""
    memory = check_memory(pipeline, plan)
    with (
        pipeline.decoding_in_tiles(memory.tiled_decode),
        pipeline.apply_loras(plan.loras),
    ):
        output = _generate(pipeline, plan, events)
    return GenerationRun(output, pipeline.model_id, pipeline.model_hash)


def _generate(
    pipeline: PipelineManager, plan: GenerationPlan, events: EventEmitter
) -> GenerationOutput:
    config = plan.config

    preview_map = preview_for(pipeline.family.architecture)

    def on_step(step: int, timestep: float, latents: torch.Tensor) -> None:
        for index, preview in enumerate(latents_to_preview_pngs(latents, preview_map)):
            events.emit(ImageGenerationStepEnd(index, step, timestep, preview))

    output = pipeline.text_to_image(
        _params(pipeline, plan, config.steps),
        round_to_latent_grid(config.width),
        round_to_latent_grid(config.height),
        on_step,
    )
    if config.hires_fix is not None:
        events.emit(GenerationPhase(plan.phases, PHASE_UPSCALING))
        output = _hires_pass(pipeline, plan, output)
    return output
