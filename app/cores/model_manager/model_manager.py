"""The model manager: which model is loaded, and the one lock around the pipeline.

THE PIPELINE LOCK (``ModelManager._lock``, a ``threading.Lock``) serialises everything that
touches the pipeline: loading, unloading, generating, and LoRA adapters. Diffusers pipelines
are not thread-safe (two generations at once crash inside the scheduler), so the lock is
taken inside the worker thread for the whole of each operation; the event loop never
blocks on it and a cancelled request cannot release it early.

Load and unload requests follow "the latest request wins": each one takes a new number
(``_epoch``); a load whose number is no longer the latest stops at its next checkpoint and
its request ends with 204, and an unload that a newer load overtook does nothing.

A load of the model that is already loaded answers at once, without the lock, only while no
unload is in flight: an unload that has already taken the lock may be releasing that very
pipeline, so such a load goes through the lock and loads the model again if it is gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from app.cores.lora_engine import LoRACache
from app.cores.model_manager.device import LoadTarget
from app.cores.model_manager.model_family import ModelFamily
from app.cores.model_manager.pipeline_manager import (
    LoadCancelledError,
    ModelSource,
    PipelineManager,
    SingleFileSource,
)
from app.cores.model_manager.placement import dtype_for, pipeline_class
from app.cores.model_manager.single_file import SingleFileError
from app.exceptions import AppError, NoModelLoadedError
from app.platform.events import EventEmitter
from app.platform.socket_events import (
    ModelLoadCompleted,
    ModelLoadFailed,
    ModelLoadProgress,
    ModelLoadStarted,
)

logger = logging.getLogger(__name__)

LOAD_STEPS = 8
"""A load reports this many ``model_load_progress`` checkpoints (``PipelineManager.load``)."""

T = TypeVar("T")


class ModelLoadError(AppError):
    status_code = 500


class ModelFileError(ModelLoadError):
    """A single-file checkpoint diffusers cannot convert (the user's file, not a fault)."""

    status_code = 400


@dataclass(frozen=True)
class LoadedModel:
    model_id: str
    config: dict[str, Any]
    sample_size: int
    family: ModelFamily
    family_evidence: str


class ModelManager:
    def __init__(
        self, events: EventEmitter, lora_cache_max_count: int = 0, lora_cache_max_bytes: int = 0
    ) -> None:
        self._events = events
        self._lora_cache_limits = (lora_cache_max_count, lora_cache_max_bytes)
        self._lock = threading.Lock()
        self._pipeline: PipelineManager | None = None
        self._loaded: LoadedModel | None = None
        """What the load response says about ``_pipeline``, computed once at load time."""
        self._epoch = 0
        self._unloads_in_flight = 0
        self._loading_model_id: str | None = None
        self.safety_check_enabled = True

    @property
    def loaded_model_id(self) -> str | None:
        pipeline = self._pipeline
        return pipeline.model_id if pipeline is not None else None

    @property
    def loaded_family(self) -> ModelFamily | None:
        """The loaded model's family (None when no model is loaded); read without the lock,
        so a generation must check again under it."""
        pipeline = self._pipeline
        return pipeline.family if pipeline is not None else None

    @property
    def loaded_model_hash(self) -> str | None:
        pipeline = self._pipeline
        return pipeline.model_hash if pipeline is not None else None

    @property
    def loading_model_id(self) -> str | None:
        return self._loading_model_id

    @property
    def unloading(self) -> bool:
        """Whether an unload request is waiting for the pipeline lock or releasing the model."""
        return self._unloads_in_flight > 0

    async def load(
        self,
        model_id: str,
        resolve_source: Callable[[], Awaitable[ModelSource]],
        device_for_load: Callable[[], LoadTarget],
    ) -> LoadedModel | None:
        """Load ``model_id``; None when the load was cancelled or duplicated (204).

        The request takes its place in the "latest request wins" order on arrival, before
        ``resolve_source`` looks the model up, so that an unload sent right after it wins.
        """
        if self._loading_model_id == model_id:
            return None
        loaded = self._loaded
        if (
            self._loading_model_id is None
            and self._unloads_in_flight == 0
            and loaded is not None
            and loaded.model_id == model_id
        ):
            self._epoch += 1  # this request is now the latest: a later unload must come after
            return loaded
        self._epoch += 1
        epoch = self._epoch
        self._loading_model_id = model_id
        try:
            source = await resolve_source()
            if epoch != self._epoch:
                return None
            return await anyio.to_thread.run_sync(
                self._load_blocking, model_id, source, epoch, device_for_load
            )
        finally:
            if self._epoch == epoch:
                self._loading_model_id = None

    async def unload(self) -> None:
        """Unload the model, after any running generation; cancels a load in progress."""
        self._epoch += 1
        self._loading_model_id = None
        self._unloads_in_flight += 1
        try:
            await anyio.to_thread.run_sync(self._unload_blocking, self._epoch)
        finally:
            self._unloads_in_flight -= 1

    async def run(self, work: Callable[[PipelineManager], T]) -> T:
        """Run ``work`` on the loaded pipeline in a worker thread, holding the lock."""
        return await anyio.to_thread.run_sync(self._run_blocking, work)

    def _run_blocking(self, work: Callable[[PipelineManager], T]) -> T:
        with self._lock:
            pipeline = self._pipeline
            if pipeline is None:
                raise NoModelLoadedError()
            pipeline.safety_check_enabled = self.safety_check_enabled
            return work(pipeline)

    @property
    def busy(self) -> bool:
        """Whether something holds the pipeline lock right now (a load, a generation...)."""
        return self._lock.locked()

    @contextmanager
    def held(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold the pipeline lock from the calling thread: every load, unload and generation
        waits until the block ends. For maintenance and for tests that need requests to
        queue at a known point; never call it from a thread that runs pipeline work."""
        if not self._lock.acquire(timeout=timeout):
            raise TimeoutError("the pipeline stayed busy")
        try:
            yield
        finally:
            self._lock.release()

    def _release(self) -> None:
        self._loaded = None
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None

    def _unload_blocking(self, epoch: int) -> None:
        with self._lock:
            if epoch == self._epoch:
                self._release()

    def _load_blocking(
        self,
        model_id: str,
        source: ModelSource,
        epoch: int,
        device_for_load: Callable[[], LoadTarget],
    ) -> LoadedModel | None:
        with self._lock:
            if epoch != self._epoch:
                return None
            if self._loaded is not None and self._loaded.model_id == model_id:
                return self._loaded  # loaded already (an overtaken unload left it in place)
            self._release()
            target = device_for_load()
            device = target.device
            emit = self._events.emit
            emit(ModelLoadStarted(model_id))

            def progress(step: int, phase: str, message: str) -> None:
                emit(ModelLoadProgress(model_id, step, LOAD_STEPS, phase, message))

            kind = (
                source.pipeline_class_name
                if isinstance(source, SingleFileSource)
                else pipeline_class(Path(source))
            )
            try:
                pipeline = PipelineManager.load(
                    model_id,
                    source,
                    device,
                    dtype_for(device, kind),
                    progress,
                    should_stop=lambda: epoch != self._epoch,
                    lora_cache=LoRACache(*self._lora_cache_limits),
                    gpu_share=target.gpu_share,
                )
            except LoadCancelledError:
                logger.info("Load of %s cancelled by a newer request", model_id)
                return None
            except SingleFileError as error:
                logger.warning("Cannot load %s: %s", model_id, error)
                emit(ModelLoadFailed(model_id, str(error)))
                raise ModelFileError(f"Failed to load model {model_id}: {error}") from error
            except Exception as error:
                logger.exception("Loading %s failed", model_id)
                emit(ModelLoadFailed(model_id, str(error)))
                raise ModelLoadError(f"Failed to load model {model_id}: {error}") from error
            if epoch != self._epoch:
                pipeline.close()
                return None
            self._pipeline = pipeline
            self._loaded = LoadedModel(
                model_id,
                pipeline.describe(),
                pipeline.sample_size,
                pipeline.family,
                pipeline.family_evidence,
            )
            logger.info("Loaded %s on %s", model_id, device)
            emit(ModelLoadCompleted(model_id))
            return self._loaded

    def forget_lora(self, cache_key: str) -> None:
        """Drop a deleted LoRA's prepared tensors; safe while a generation runs."""
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.loras.discard(cache_key)

    def shutdown(self) -> None:
        self._epoch += 1
        with self._lock:
            self._release()
