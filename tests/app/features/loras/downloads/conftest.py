"""Fixtures for LoRA downloads: settings pointing at the fake remote (Hugging Face, CivitAI,
plain files) with quick retries, and the bytes of real LoRA files. The download helpers are
in ``tests.api``."""

from __future__ import annotations

import pytest

from app.config import Settings
from tests.app.features.loras.conftest import LoRASources
from tests.fake_remote import FakeRemote


@pytest.fixture
def settings(settings: Settings, remote: FakeRemote) -> Settings:
    """The suite's settings, with both services on the fake remote and quick retries."""
    return settings.model_copy(
        update={
            "huggingface_base_url": remote.url("/hf"),
            "civitai_base_url": remote.url("/civitai"),
            "lora_download_attempts": 3,
            "lora_download_retry_delay": 0.01,
            "lora_download_timeout": 5.0,
        }
    )


@pytest.fixture(scope="session")
def lora_bytes(lora_sources: LoRASources) -> dict[str, bytes]:
    """Bytes of the factory's files: ``kohya_unet``, ``peft_unet``, ``pickle_renamed``..."""
    return {path.stem: path.read_bytes() for path in lora_sources.folder.glob("*.safetensors")}
