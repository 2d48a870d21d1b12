"""Fixtures for the hub routes: settings pointing at the fake Hub on loopback, with quick
retries."""

from __future__ import annotations

import pytest

from app.config import Settings
from tests.fake_remote import FakeRemote


@pytest.fixture
def settings(settings: Settings, remote: FakeRemote) -> Settings:
    return settings.model_copy(
        update={
            "huggingface_base_url": remote.url("/hub"),
            "lora_download_attempts": 3,
            "lora_download_retry_delay": 0.01,
            "lookup_timeout": 30.0,
        }
    )
