"""Helpers for the LoRA inspection and fit tests: generate, checksum and refuse on a pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.cores.lora_engine import LoRACache, LoRAIncompatibleError, LoRARequest
from app.cores.lora_files.inspection import inspect_lora_header
from app.cores.lora_files.inspection_types import LoRAInspection
from app.cores.lora_files.safetensors_file import read_header
from app.cores.model_manager.pipeline_manager import PipelineManager
from tests.checksums import weights_checksum as checksum


def generate(pipeline: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    result = pipeline(
        "a red cube",
        num_inference_steps=4,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    )
    image: np.ndarray = result.images[0]
    return image


def has_adapters(pipeline: Any) -> bool:
    return any(
        hasattr(component, "peft_config") or getattr(component, "_hf_peft_config_loaded", False)
        for component in (pipeline.unet, pipeline.text_encoder)
    )


def inspect_file(path: Path) -> LoRAInspection:
    return inspect_lora_header(read_header(path))


def assert_refused_untouched(path: Path, pipeline: Any) -> LoRAIncompatibleError:
    """The engine refuses the file at generation and leaves the pipeline as it was."""
    manager = PipelineManager(pipeline, "tiny", torch.device("cpu"), LoRACache(4, 1 << 30))
    before = checksum(pipeline)
    request = LoRARequest(id=1, name="my-lora", path=path, content_key=path.name)
    with pytest.raises(LoRAIncompatibleError) as caught, manager.apply_loras([request]):
        pass
    assert checksum(pipeline) == before
    assert not has_adapters(pipeline)
    return caught.value


def load_and_generate(pipeline: Any, path: Path) -> np.ndarray:
    pipeline.load_lora_weights(str(path), adapter_name="x")
    try:
        return generate(pipeline)
    finally:
        pipeline.unload_lora_weights()
