"""The blocking part of a generation: runs in a worker thread with the pipeline lock held."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from app.cores.model_manager.memory import GiB, ImagePass, MemoryPlan, MemoryShares
from app.cores.model_manager.model_family import ModelFamily
from app.cores.model_manager.pipeline_manager import (
    AdapterSpec,
    DiffusionParams,
    GenerationOutput,
    PipelineManager,
)
from app.exceptions import BadRequestError
from app.features.config.upscalers import PIL_RESAMPLING
from app.features.generators.previews import latents_to_preview_pngs
from app.features.generators.samplers import make_scheduler
from app.features.generators.schemas import GeneratorConfig
from app.features.loras.base_model import incompatibility_message, is_compatible
from app.features.loras.lora_inspector import InvalidLoRAError, check_lora_fits_pipeline
from app.features.loras.service import LoRASelection
from app.services.events import EventEmitter

PHASE_IMAGE_GENERATION = "image_generation"
PHASE_UPSCALING = "upscaling"
PHASE_COMPLETED = "completed"


def round_to_latent_grid(size: int) -> int:
    """Round down to a multiple of 8, the VAE's scale factor."""
    return max(64, size - size % 8)


class LoRAIncompatibleError(BadRequestError):
    """A requested LoRA does not fit the loaded model."""


class MemoryLimitError(BadRequestError):
    """The request needs more memory than the user lets the backend use."""


def adapter_for(lora: LoRASelection) -> AdapterSpec:
    return AdapterSpec(
        adapter_name=lora.adapter_name,
        display_name=lora.name,
        path=str(lora.file_path),
        weight=lora.weight,
        cache_key=lora.sha256,
        unet_weight=lora.unet_weight,
        text_encoder_weight=lora.text_encoder_weight,
    )


@dataclass(frozen=True)
class GenerationPlan:
    config: GeneratorConfig
    seeds: list[int]
    memory: MemoryShares
    loras: tuple[LoRASelection, ...] = ()

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


def check_families(pipeline: PipelineManager, loras: tuple[LoRASelection, ...]) -> None:
    """Refuse a LoRA made for another model family, naming both, before anything is read."""
    for lora in loras:
        if is_compatible(lora.base_model, pipeline.family) is False:
            made_for = ModelFamily(str(lora.base_model))
            raise LoRAIncompatibleError(
                incompatibility_message(lora.name, made_for, pipeline.family)
            )


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
    """Generate with the plan's LoRAs loaded; they are unloaded whatever happens."""
    check_families(pipeline, plan.loras)
    # The family check misses what detection could not classify; every LoRA's layers are
    # also checked against the model before the pipeline is touched. A LoRA already prepared
    # for this model passed that check when it was prepared: its file is not read again.
    for lora in plan.loras:
        if pipeline.is_prepared(lora.sha256):
            continue
        try:
            check_lora_fits_pipeline(lora.file_path, pipeline.pipeline, lora.name)
        except InvalidLoRAError as error:
            raise LoRAIncompatibleError(str(error)) from error
    memory = check_memory(pipeline, plan)
    with (
        pipeline.decoding_in_tiles(memory.tiled_decode),
        pipeline.loras_applied([adapter_for(lora) for lora in plan.loras]),
    ):
        output = _generate(pipeline, plan, events)
    return GenerationRun(output, pipeline.model_id, pipeline.model_hash)


def _generate(
    pipeline: PipelineManager, plan: GenerationPlan, events: EventEmitter
) -> GenerationOutput:
    config = plan.config

    def on_step(step: int, timestep: float, latents: torch.Tensor) -> None:
        for index, preview in enumerate(latents_to_preview_pngs(latents)):
            events.emit(
                "image_generation_step_end",
                {
                    "index": index,
                    "current_step": step,
                    "timestep": timestep,
                    "image_base64": preview,
                },
            )

    output = pipeline.text_to_image(
        _params(pipeline, plan, config.steps),
        round_to_latent_grid(config.width),
        round_to_latent_grid(config.height),
        on_step,
    )
    if config.hires_fix is not None:
        events.emit("generation_phase", {"phases": plan.phases, "current": PHASE_UPSCALING})
        output = _hires_pass(pipeline, plan, output)
    return output
