"""The LoRA engine: apply a request's LoRAs to the loaded pipeline for one generation.

:meth:`LoRAEngine.applied` is the one entry point. In order, it refuses a LoRA made for
another model family (naming both), prepares each LoRA (reads the file, maps every layer onto
the model and checks its size: :mod:`~app.cores.lora_engine.preparation`; cached per loaded
model), fuses the weighted set into the weights (:mod:`~app.cores.lora_engine.fusion`), and
restores the base weights bit for bit when the block ends, whatever happened inside.

With the cache disabled (``LOCALAI_LORA_CACHE_MAX_COUNT=0``), LoRAs that diffusers loads the
same way (plain LoRA layers in diffusers' names) go through Plan 006's path instead:
``load_lora_weights`` + ``set_adapters`` per request and ``unload_lora_weights`` afterwards.

Nothing here is thread-safe: call it with the pipeline lock held (see ``ModelManager``),
except :meth:`LoRAEngine.discard`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from app.cores.lora_engine.backups import BackupPool
from app.cores.lora_engine.cache import LoRACache
from app.cores.lora_engine.errors import LoRAIncompatibleError
from app.cores.lora_engine.fusion import fused
from app.cores.lora_engine.key_mapping import COMPONENTS, KeyMapper
from app.cores.lora_engine.preparation import PreparedLoRA, prepare
from app.cores.lora_engine.request import LoRARequest
from app.cores.model_manager.model_family import (
    ModelFamily,
    incompatibility_message,
    is_compatible,
)

logger = logging.getLogger(__name__)


def _family_problem(request: LoRARequest, model: ModelFamily) -> str | None:
    if is_compatible(request.base_model, model) is not False:
        return None
    return incompatibility_message(request.name, ModelFamily(str(request.base_model)), model)


class LoRAEngine:
    """Applies LoRAs to one loaded pipeline (see the module docstring)."""

    def __init__(
        self,
        pipeline: Any,
        family: ModelFamily,
        device: torch.device,
        cache: LoRACache,
        *,
        weights_streamed: bool = False,
        weights_offloaded: bool = False,
    ) -> None:
        self._pipeline = pipeline
        self._weights_streamed = weights_streamed
        """Sequential offload: the modules hold no weights between uses, so none can be
        changed (accelerate streams them from its own copy)."""
        self._family = family
        self._device = device
        self.cache = cache
        self._mapper = KeyMapper(pipeline)
        self.backups = BackupPool(swap=device.type == "cpu" and not weights_offloaded)
        """Keeps the base weights the current request changed (buffers reused across
        requests): swapped on a CPU pipeline, copied to host memory on a GPU or when the
        model is offloaded (its modules move between devices)."""

    @contextlib.contextmanager
    def applied(self, requests: Sequence[LoRARequest]) -> Iterator[None]:
        """Apply ``requests`` for the duration of the block; raises
        :class:`LoRAIncompatibleError` before touching the model if any cannot be applied."""
        if not requests:
            yield
            return
        if self._weights_streamed:
            raise LoRAIncompatibleError(
                "LoRAs cannot be applied to this model as it is loaded: it does not fit the "
                "GPU memory the backend may use even one part at a time, so its weights stream "
                "to the GPU layer by layer. Raise the GPU memory share (gpu_scale_factor) and "
                "load it again, or use a smaller model."
            )
        for request in requests:
            problem = _family_problem(request, self._family)
            if problem is not None:
                raise LoRAIncompatibleError(problem)
        prepared = self._prepared(requests)
        for request in requests:
            logger.info(
                "Applying LoRA '%s' (id %d, %s)",
                request.name,
                request.id,
                request.describe_weight(),
            )
        plan_006 = not self.cache.enabled and all(e.diffusers_loads_it for e in prepared)
        if plan_006 and self._loaded_as_adapters(requests):
            try:
                yield
            finally:
                self._pipeline.unload_lora_weights()
                logger.info("Unloaded all LoRAs")
            return
        selection = list(zip(prepared, requests, strict=True))
        with fused(self._mapper, selection, self.backups) as changed:
            logger.info("Fused %d LoRA(s) into %d tensors", len(requests), changed)
            yield
        logger.info("Restored the base weights")

    def is_prepared(self, content_key: str) -> bool:
        """Whether this LoRA is cached for this model (so it is known to fit)."""
        return self.cache.contains(content_key)

    def discard(self, content_key: str) -> None:
        """Forget a LoRA (its file is being deleted); safe from any thread."""
        self.cache.discard(content_key)

    def _prepared(self, requests: Sequence[LoRARequest]) -> list[PreparedLoRA]:
        keep = {request.content_key for request in requests}
        entries = []
        for request in requests:
            entry = self.cache.get(request.content_key)
            if entry is None:
                entry = prepare(request, self._mapper, pin_memory=self._device.type == "cuda")
                self.cache.put(entry, keep)
            entries.append(entry)
        return entries

    def _loaded_as_adapters(self, requests: Sequence[LoRARequest]) -> bool:
        """Plan 006: each LoRA as a PEFT adapter for the request (``unload_lora_weights``
        afterwards leaves the modules bit-identical: measured, see NOTES-LORA-FACTS). False,
        with nothing loaded, when diffusers cannot load one (it cannot tell the format of a
        Kohya text-encoder file without out_proj/MLP layers, for one): the engine fuses them."""
        pipeline = self._pipeline
        names = [f"lora_{request.id}" for request in requests]
        components = [
            c for c in COMPONENTS if isinstance(getattr(pipeline, c, None), torch.nn.Module)
        ]
        try:
            for name, request in zip(names, requests, strict=True):
                # use_safetensors: never fall back to diffusers' pickle loader.
                pipeline.load_lora_weights(
                    str(request.path), adapter_name=name, use_safetensors=True
                )
            pipeline.set_adapters(
                names,
                adapter_weights=[{c: r.weight_for(c) for c in components} for r in requests],
            )
        except Exception as error:  # diffusers raises many kinds for files it cannot read
            pipeline.unload_lora_weights()
            logger.info("diffusers cannot load these LoRAs (%s); fusing them instead", error)
            return False
        logger.info("Loaded %d LoRA(s) as adapters", len(requests))
        return True

    def close(self) -> None:
        self.cache.clear()
        self.backups.clear()
        self._pipeline = None
