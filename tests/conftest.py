"""Fixtures shared by the whole suite: the real embedded model, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from app.cores.model_manager.embedded_model import build_embedded_model


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model as a diffusers folder (the same bytes the server writes)."""
    return build_embedded_model(tmp_path_factory.mktemp("models") / "embedded--tiny-sd")


@pytest.fixture
def tiny_pipeline(embedded_model_dir: Path) -> StableDiffusionPipeline:
    """A fresh StableDiffusionPipeline on the CPU, loaded from the embedded model folder."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(embedded_model_dir), torch_dtype=torch.float32, local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
