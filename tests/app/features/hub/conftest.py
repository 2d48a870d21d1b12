"""Fixtures for the hub routes: the fake Hub on loopback, settings pointing at it with quick
retries, and the events the app broadcasts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI

from app.config import Settings
from tests.fake_remote import FakeRemote

Event = tuple[str, dict[str, Any]]


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


@pytest.fixture
def events(app: FastAPI) -> Iterator[list[Event]]:
    """Every event the app broadcasts during the test, in order."""
    received: list[Event] = []
    remove = app.state.events.add_listener(lambda name, data: received.append((name, data)))
    yield received
    remove()
