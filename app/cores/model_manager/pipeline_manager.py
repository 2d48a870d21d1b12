"""One loaded diffusers pipeline and the operations on it.

Nothing here is thread-safe: every method must be called with the pipeline lock held
(see ``ModelManager``). Methods are blocking and meant to run in a worker thread.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image
from PIL import Image

from app.cores.lora_engine import LoRACache, LoRAEngine, LoRARequest
from app.cores.model_manager.checkpoint_files import CheckpointInfo
from app.cores.model_manager.memory import (
    ImagePass,
    MemoryPlan,
    MemoryShares,
    budget_for,
    plan_memory,
    weights_bytes,
)
from app.cores.model_manager.model_family import ModelFamily, detect_pipeline
from app.cores.model_manager.model_hash import file_short_hash
from app.cores.model_manager.model_hash import model_hash as hash_model_folder
from app.cores.model_manager.placement import Placement, component_bytes, plan_placement
from app.cores.model_manager.single_file import load_single_file
from app.cores.model_manager.single_file import pipeline_class as single_file_pipeline_class
from app.platform.cpu_runtime import release_free_memory

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, float, torch.Tensor], None]
"""Called after each denoising step with (step index, timestep, latents)."""

ProgressCallback = Callable[[int, str, str], None]
"""Called at each load checkpoint with (step 1..8, phase, message)."""


class LoadCancelledError(Exception):
    """A newer load or unload request made this load pointless."""


@dataclass(frozen=True)
class DiffusionParams:
    """What one denoising run needs, independent of the pipeline kind."""

    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    clip_skip: int
    seeds: list[int]
    scheduler: Any


_USER_FIELDS = ("clip_skip", "negative_prompt", "guidance_scale")
"""Arguments that come from the user's config: dropping one is worth a log line."""


def _for_pipeline(pipeline: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments this pipeline's ``__call__`` takes. The UI sends the same fields for
    every family; those a family has no use for (``clip_skip`` for SD3 and FLUX.1, which
    choose their text layers themselves) are left out, with a log line when set."""
    accepted = inspect.signature(pipeline.__call__).parameters
    dropped = [key for key in _USER_FIELDS if key not in accepted and kwargs.get(key) is not None]
    if dropped:
        logger.info("%s does not use %s; ignored", type(pipeline).__name__, ", ".join(dropped))
    return {key: value for key, value in kwargs.items() if key in accepted}


def unpacked(latents: torch.Tensor, width: int, height: int, vae_scale: int) -> torch.Tensor:
    """FLUX.1 works on packed latents, (B, tokens, 4C): each token holds a 2x2 patch of C
    channels. Back to (B, C, h, w) for previews; other latents are returned as they are."""
    if latents.ndim != 3:
        return latents
    batch, _tokens, packed = latents.shape
    rows, cols = height // (vae_scale * 2), width // (vae_scale * 2)
    shape = (batch, packed // 4, rows * 2, cols * 2)
    if latents.device.type == "cpu" and latents.dtype in (torch.float32, torch.float16):
        # On the CPU a torch copy here wakes torch's OpenMP pool, whose spinning threads cost
        # a preview 16 ms on a busy 2-core machine (benchmarks.http_costs); NumPy: 1 ms.
        grid = latents.numpy().reshape(batch, rows, cols, packed // 4, 2, 2)
        return torch.from_numpy(grid.transpose(0, 3, 1, 4, 2, 5).reshape(shape))
    patches = latents.reshape(batch, rows, cols, packed // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(shape)


@dataclass(frozen=True)
class SingleFileSource:
    """A single-file checkpoint (original A1111/ComfyUI layout) and the local diffusers folder
    whose config files configure it (``single_file.load_single_file``)."""

    path: Path
    config: Path
    info: CheckpointInfo
    model_hash: str | None = None
    """A1111's short hash of the file, when already known (else computed at load)."""

    @property
    def pipeline_class_name(self) -> str:
        return str(single_file_pipeline_class(self.info.family).__name__)


ModelSource = str | SingleFileSource
"""What a load reads: a diffusers folder (its path), or a single file with its configs."""


def _load_pipeline(source: ModelSource, dtype: torch.dtype) -> tuple[Any, str | None]:
    """The pipeline of ``source`` and its short hash for the infotext."""
    if isinstance(source, SingleFileSource):
        pipeline = load_single_file(source.path, source.config, torch_dtype=dtype, info=source.info)
        return pipeline, source.model_hash or file_short_hash(source.path)
    pipeline = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype, local_files_only=True)
    return pipeline, hash_model_folder(Path(source))


@dataclass(frozen=True)
class GenerationOutput:
    images: list[Image.Image]
    nsfw: list[bool]


class PipelineManager:
    """Owns a text-to-image pipeline and an image-to-image view sharing its components."""

    def __init__(
        self,
        pipeline: Any,
        model_id: str,
        device: torch.device,
        lora_cache: LoRACache | None = None,
        model_hash: str | None = None,
        placement: Placement = Placement.ON_DEVICE,
    ) -> None:
        self.pipeline = pipeline
        self.model_id = model_id
        self.device = device
        detection = detect_pipeline(pipeline)
        self.family: ModelFamily = detection.family
        """Computed once from the pipeline's configs; LoRAs of another family are refused."""
        self.family_evidence = detection.evidence
        """Why that family, in a sentence (logged at load, in the load response)."""
        self.model_hash = model_hash
        """Short hash of the denoiser weights for the PNG infotext (``model_hash``)."""
        self.placement = placement
        """Whole on ``device``, or offloaded to the CPU between uses (``placement``)."""
        self.loras = LoRAEngine(
            pipeline,
            self.family,
            # Offloaded weights rest on the CPU: LoRAs are fused there, with the weights.
            device if placement is Placement.ON_DEVICE else torch.device("cpu"),
            lora_cache or LoRACache(max_count=0, max_bytes=0),
            weights_streamed=placement is Placement.SEQUENTIAL_OFFLOAD,
            weights_offloaded=placement is not Placement.ON_DEVICE,
        )
        """Applies LoRAs to this pipeline (the only code that changes its weights)."""
        self._scheduler_config: Mapping[str, Any] = MappingProxyType(
            dict(pipeline.scheduler.config)
        )
        """The model's own scheduler config, as loaded. Every request's scheduler is built
        from it: the pipeline's current scheduler is whatever the previous request used
        (with its Karras sigmas and other options)."""
        self.weights_bytes = weights_bytes(pipeline)
        # The VAE decodes (and encodes) one image at a time: a batch's peak is one image's,
        # so the memory estimate holds at any batch size (see ``memory``).
        pipeline.vae.enable_slicing()
        # Shares every module with the text-to-image pipeline: no extra memory.
        self.img2img = AutoPipelineForImage2Image.from_pipe(pipeline)
        self.safety_check_enabled = True
        pipeline.set_progress_bar_config(disable=True)
        self.img2img.set_progress_bar_config(disable=True)

    @classmethod
    def load(
        cls,
        model_id: str,
        source: ModelSource,
        device: torch.device,
        dtype: torch.dtype,
        progress: ProgressCallback,
        should_stop: Callable[[], bool],
        lora_cache: LoRACache | None = None,
        gpu_share: float = 1.0,
    ) -> PipelineManager:
        """Load ``source`` (a diffusers folder, or a single file with its configs) onto
        ``device``, offloaded to the CPU when it does not fit ``gpu_share`` of a GPU
        (``placement``); raises LoadCancelledError."""

        def checkpoint(step: int, phase: str, message: str) -> None:
            if should_stop():
                raise LoadCancelledError(model_id)
            progress(step, phase, message)

        checkpoint(1, "initialization", f"Starting to load {model_id}")
        checkpoint(2, "initialization", "Checking the local model files")
        checkpoint(3, "loading_model", "Preparing the pipeline")
        checkpoint(4, "loading_model", "Loading model weights")
        pipeline, short_hash = _load_pipeline(source, dtype)
        checkpoint(5, "loading_model", "Model weights loaded")
        memory = (
            torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        )
        plan = plan_placement(
            device, weights_bytes(pipeline), max(component_bytes(pipeline)), memory, gpu_share
        )
        checkpoint(6, "device_setup", plan.message)
        if plan.placement is Placement.MODEL_OFFLOAD:
            pipeline.enable_model_cpu_offload(device=device)
        elif plan.placement is Placement.SEQUENTIAL_OFFLOAD:
            pipeline.enable_sequential_cpu_offload(device=device)
        else:
            pipeline.to(device)
        checkpoint(7, "device_setup", "Applying optimisations")
        if device.type == "mps":
            pipeline.enable_attention_slicing()
        manager = cls(pipeline, model_id, device, lora_cache, short_hash, plan.placement)
        logger.info(
            "%s is a %s model (%s; hash %s, %s)",
            model_id,
            manager.family.value,
            manager.family_evidence,
            short_hash,
            plan.placement.value,
        )
        checkpoint(8, "optimization", "Model ready")
        return manager

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        return self._scheduler_config

    @property
    def sample_size(self) -> int:
        """The denoiser's native latent size (the contract's ``sample_size``: 64 for SD 1.x,
        128 for SDXL, SD3 and FLUX.1, whose pipelines say so as ``default_sample_size``)."""
        default = getattr(self.pipeline, "default_sample_size", None)
        if isinstance(default, int) and default > 0:
            return default
        denoiser = getattr(self.pipeline, "unet", None) or self.pipeline.transformer
        return int(getattr(denoiser.config, "sample_size", 64) or 64)

    def memory_plan(self, passes: list[ImagePass], shares: MemoryShares) -> MemoryPlan:
        """How ``passes`` would run within the user's share of this device's memory."""
        budget = budget_for(self.device, shares, self.weights_bytes)
        return plan_memory(self.pipeline, passes, budget)

    @contextlib.contextmanager
    def decoding_in_tiles(self, enabled: bool) -> Iterator[None]:
        """Decode in tiles for the block when ``enabled`` (it changes pixels slightly at the
        tiles' seams, so only when one whole image would not fit)."""
        if not enabled:
            yield
            return
        self.pipeline.vae.enable_tiling()
        try:
            yield
        finally:
            self.pipeline.vae.disable_tiling()

    def describe(self) -> dict[str, Any]:
        """The pipeline's component config, as the contract's load response shows it."""
        return {k: v for k, v in dict(self.pipeline.config).items() if not k.startswith("_")}

    def _text_encoder_layers(self) -> int:
        encoder = getattr(self.pipeline, "text_encoder", None)
        return int(getattr(getattr(encoder, "config", None), "num_hidden_layers", 1) or 1)

    def _common_kwargs(self, params: DiffusionParams) -> dict[str, Any]:
        """The UI's fields as this family's pipeline takes them (README, "Model families"):

        * ``cfg_scale`` is classifier-free guidance for SD 1.x/2.x/SDXL/SD3; FLUX.1 dev is
          guidance-distilled: the value goes to its guidance embedding (``guidance_scale``,
          3.5 is FLUX.1 dev's usual value), and FLUX.1 schnell has none and ignores it.
        * ``negative_prompt`` needs CFG: FLUX.1 runs without it (true CFG would double the
          cost of every step), so it is ignored there, with a log line.
        * ``clip_skip`` (A1111's count: 1 = none) applies to every CLIP encoder (both of
          SDXL's and SD3's); FLUX.1's pipeline has no such option (``_for_pipeline`` logs it).
        """
        # A1111 counts clip skip from 1 (no skip); diffusers counts skipped layers.
        skipped = min(params.clip_skip - 1, self._text_encoder_layers() - 1)
        negative: str | None = params.negative_prompt
        if self.family.architecture is ModelFamily.FLUX:
            if negative:
                logger.info("FLUX.1 runs without classifier-free guidance: negative prompt ignored")
            negative = None
            transformer = getattr(self.pipeline, "transformer", None)
            if not getattr(getattr(transformer, "config", None), "guidance_embeds", True):
                logger.info("This FLUX.1 model has no guidance input: cfg_scale ignored")
        return {
            "prompt": [params.prompt] * len(params.seeds),
            "negative_prompt": [negative] * len(params.seeds) if negative is not None else None,
            "num_inference_steps": params.steps,
            "guidance_scale": params.cfg_scale,
            "clip_skip": skipped if skipped > 0 else None,
            # CPU generators give the same noise on every device: seeds reproduce anywhere.
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in params.seeds],
        }

    def _run(self, pipeline: Any, kwargs: dict[str, Any]) -> GenerationOutput:
        kwargs = _for_pipeline(pipeline, kwargs)
        saved_checker = getattr(pipeline, "safety_checker", None)
        if not self.safety_check_enabled and saved_checker is not None:
            pipeline.safety_checker = None
        try:
            output = pipeline(**kwargs)
        finally:
            if saved_checker is not None:
                pipeline.safety_checker = saved_checker
        images: list[Image.Image] = list(output.images)
        flags = getattr(output, "nsfw_content_detected", None) or [False] * len(images)
        return GenerationOutput(images=images, nsfw=[bool(flag) for flag in flags])

    def text_to_image(
        self, params: DiffusionParams, width: int, height: int, on_step: StepCallback | None
    ) -> GenerationOutput:
        self.pipeline.scheduler = params.scheduler
        kwargs = self._common_kwargs(params) | {"width": width, "height": height}
        if on_step is not None:
            scale = int(getattr(self.pipeline, "vae_scale_factor", 8))

            def step_end(_pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
                on_step(step, float(timestep), unpacked(tensors["latents"], width, height, scale))
                return tensors

            kwargs["callback_on_step_end"] = step_end
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        return self._run(self.pipeline, kwargs)

    def image_to_image(
        self, params: DiffusionParams, images: list[Image.Image], strength: float
    ) -> GenerationOutput:
        self.img2img.scheduler = params.scheduler
        # SD3's and FLUX's image-to-image pipelines size the output by width/height (their
        # default: the model's native size), not by the input image.
        size = {"width": images[0].width, "height": images[0].height}
        kwargs = self._common_kwargs(params) | {"image": images, "strength": strength} | size
        return self._run(self.img2img, kwargs)

    def apply_loras(self, requests: Sequence[LoRARequest]) -> AbstractContextManager[None]:
        """Apply ``requests`` for the duration of the ``with`` block; afterwards the model is
        the base model again, bit for bit. Raises ``LoRAIncompatibleError`` (a 400) before
        anything changes when one cannot be applied. See ``app.cores.lora_engine``."""
        return self.loras.applied(requests)

    def close(self) -> None:
        """Drop every reference to the weights and give the memory back."""
        self.pipeline = None
        self.img2img = None
        self.loras.close()
        gc.collect()
        # With the CPU start-up settings glibc keeps freed memory; give it back now.
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("Released pipeline of %s", self.model_id)
