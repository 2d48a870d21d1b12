"""Fixtures shared by the whole suite: the real embedded model (built once per test session),
settings on a cache of the test's own, the app running on them (``app``, ``client``,
``loaded_client``), the same app behind a real server (``server_url``), the events it emits,
and the fake remote services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fastapi import FastAPI

from app.config import Settings
from app.cores.model_manager.embedded_model import build_embedded_model
from tests.api import load_model
from tests.factories.family_models import Family, FamilyModelDir, write_family_model
from tests.factories.hub_repos import write_sd15_repo, write_sdxl_repo
from tests.fake_remote import FakeRemote, running_remote
from tests.harness import (
    Event,
    SmallDisk,
    live_server,
    recorded_events,
    running_app,
    settings_with_embedded_model,
    small_disk,
)


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model as a diffusers folder (the same bytes the server writes)."""
    return build_embedded_model(tmp_path_factory.mktemp("models") / "embedded--tiny-sd")


@pytest.fixture(scope="session")
def sd15_repo_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """An SD 1.5-shaped Hub repository (fp32 + fp16 weights) whose images differ from the
    embedded model's; read-only for tests (the fake Hub serves it)."""
    folder = tmp_path_factory.mktemp("hub") / "sd15"
    return write_sd15_repo(folder, seed=15, embedded=embedded_model_dir)


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory: pytest.TempPathFactory) -> FamilyModelDir:
    """``family_model_dir(family, seed=0)``: the tiny model of that family
    (``tests.factories.family_models``) as a diffusers folder, built on first use and then
    shared by the whole session; read-only for tests."""
    built: dict[tuple[Family, int], Path] = {}

    def family_model(family: Family, seed: int = 0) -> Path:
        if (family, seed) not in built:
            folder = tmp_path_factory.mktemp("family") / f"{family}-{seed}"
            built[family, seed] = write_family_model(family, folder, seed)
        return built[family, seed]

    return family_model


@pytest.fixture(scope="session")
def sdxl_repo_dir(
    tmp_path_factory: pytest.TempPathFactory, family_model_dir: FamilyModelDir
) -> Path:
    """A tiny SDXL-shaped Hub repository (fp32 + fp16 weights); read-only for tests."""
    folder = tmp_path_factory.mktemp("hub") / "sdxl"
    return write_sdxl_repo(folder, seed=1, built=family_model_dir("sdxl", seed=1))


@pytest.fixture
def tiny_pipeline(embedded_model_dir: Path) -> Any:
    """A fresh StableDiffusionPipeline on the CPU, loaded from the embedded model folder
    (typed ``Any``: diffusers leaves most of a pipeline's attributes unannotated)."""
    pipeline: Any = StableDiffusionPipeline.from_pretrained(
        str(embedded_model_dir), torch_dtype=torch.float32, local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def settings(tmp_path: Path, embedded_model_dir: Path) -> Settings:
    """Settings for one test: its own cache folder, with the embedded model pre-copied."""
    return settings_with_embedded_model(tmp_path / "cache", embedded_model_dir)


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """``running_app`` on the test's ``settings``: what ``app`` and ``client`` are."""
    async with running_app(settings) as app_and_client:
        yield app_and_client


@pytest.fixture
def app(running: tuple[FastAPI, httpx.AsyncClient]) -> FastAPI:
    """The real FastAPI app with its lifespan run: migrated SQLite file, model registered."""
    return running[0]


@pytest.fixture
def client(running: tuple[FastAPI, httpx.AsyncClient]) -> httpx.AsyncClient:
    """HTTP through the full ASGI stack (access guard, Socket.IO, middleware, routes)."""
    return running[1]


@pytest.fixture
async def loaded_client(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """A client whose backend has the embedded model loaded."""
    await load_model(client)
    return client


@pytest.fixture
def emitted(app: FastAPI) -> Iterator[list[Event]]:
    """Every event the app emits from now to the end of the test, in order (no Socket.IO
    client needed)."""
    with recorded_events(app) as received:
        yield received


@pytest.fixture
def server_url(settings: Settings) -> Iterator[str]:
    """The app on the test's ``settings`` served by a real uvicorn on a loopback port."""
    with live_server(settings) as url:
        yield url


@pytest.fixture
def small_disk_settings(
    tmp_path: Path, embedded_model_dir: Path
) -> Iterator[tuple[Settings, SmallDisk]]:
    """Settings whose whole cache folder (database included) lives on a 24 MiB file system
    the test can fill; the embedded model is pre-copied onto it."""
    with small_disk(tmp_path / "small", 24) as disk:
        yield settings_with_embedded_model(disk.root / "cache", embedded_model_dir), disk


@pytest.fixture
def remote() -> Iterator[FakeRemote]:
    """The fake remote services (files, Hugging Face Hub, CivitAI) on a loopback port."""
    with running_remote() as fake:
        yield fake
