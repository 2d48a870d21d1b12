"""Fixtures for the LoRA API tests: a folder of real LoRA files (good and bad) written once by
the factory for the tiny embedded pipeline."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline

from tests.factories import lora_files


@dataclass(frozen=True)
class LoRASources:
    """Factory-written files, shared by the whole session: copy one before changing it."""

    folder: Path

    def __getitem__(self, name: str) -> Path:
        path = self.folder / f"{name}.safetensors"
        assert path.is_file(), f"no source file {name!r}"
        return path


@pytest.fixture(scope="session")
def lora_sources(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> LoRASources:
    """Good and bad LoRA files for the tiny pipeline (loaded as ``tiny_pipeline`` loads it).

    Good: ``kohya_unet``, ``kohya_unet_te``, ``peft_unet``, ``peft_unet_te``, ``legacy_unet``,
    ``style_a`` / ``style_b`` (different content). Bad: ``truncated``, ``truncated_header``,
    ``header_bomb``, ``pickle_renamed``, ``unrelated``, ``full_checkpoint``,
    ``down_without_up``.
    """
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(embedded_model_dir), torch_dtype=torch.float32, local_files_only=True
    )
    folder = tmp_path_factory.mktemp("lora-sources")

    def path(name: str) -> Path:
        return folder / f"{name}.safetensors"

    good = lora_files.write_lora(path("kohya_unet"), pipeline, fmt="kohya")
    lora_files.write_lora(
        path("kohya_unet_te"), pipeline, fmt="kohya", components=("unet", "text_encoder")
    )
    lora_files.write_lora(path("peft_unet"), pipeline, fmt="peft", seed=1)
    lora_files.write_lora(
        path("peft_unet_te"), pipeline, fmt="peft", components=("unet", "text_encoder"), seed=1
    )
    lora_files.write_lora(path("legacy_unet"), pipeline, fmt="diffusers_legacy", seed=2)
    lora_files.write_lora(path("style_a"), pipeline, seed=3)
    lora_files.write_lora(path("style_b"), pipeline, seed=4, rank=2)
    lora_files.write_truncated(path("truncated"), good)
    lora_files.write_truncated_header(path("truncated_header"), good)
    lora_files.write_header_bomb(path("header_bomb"))
    lora_files.write_pickle_renamed(path("pickle_renamed"))
    lora_files.write_unrelated_tensors(path("unrelated"))
    lora_files.write_full_checkpoint_like(path("full_checkpoint"))
    lora_files.write_down_without_up(path("down_without_up"), pipeline)
    return LoRASources(folder)


@pytest.fixture
def user_files(tmp_path: Path, lora_sources: LoRASources) -> Callable[..., Path]:
    """Place a copy of a source file where a user keeps it: ``user_files("kohya_unet",
    "my style.safetensors", folder="downloads")`` -> ``<tmp>/user/downloads/my style...``."""

    def place(source: str, file_name: str | None = None, *, folder: str = "") -> Path:
        target = tmp_path / "user" / folder / (file_name or f"{source}.safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lora_sources[source], target)
        return target

    return place


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """An empty folder for files a test writes itself."""
    folder = tmp_path / "user"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def pipeline(tiny_pipeline: Any) -> Iterator[Any]:
    """The shared tiny pipeline, with every LoRA unloaded after the test."""
    yield tiny_pipeline
    tiny_pipeline.unload_lora_weights()


@pytest.fixture(scope="session")
def distinct_loras(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path
) -> list[bytes]:
    """20 real LoRA files that differ in content (their metadata)."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(embedded_model_dir), torch_dtype=torch.float32, local_files_only=True
    )
    folder = tmp_path_factory.mktemp("distinct-loras")
    return [
        lora_files.write_lora(
            folder / f"{index}.safetensors", pipeline, metadata={"ss_output_name": f"n{index}"}
        ).read_bytes()
        for index in range(20)
    ]
