"""Fixtures shared by the whole suite: the real embedded model, built once per test session."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fastapi import FastAPI

from app.config import EMBEDDED_MODEL_ID, Settings
from app.cores.model_manager.embedded_model import build_embedded_model
from app.main import create_app
from tests.factories.family_models import Family, FamilyModelDir, write_family_model
from tests.factories.hub_repos import write_sd15_repo, write_sdxl_repo
from tests.fake_remote import FakeRemote, running_remote
from tests.harness import SmallDisk, http_client, small_disk


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
def tiny_pipeline(embedded_model_dir: Path) -> StableDiffusionPipeline:
    """A fresh StableDiffusionPipeline on the CPU, loaded from the embedded model folder."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(embedded_model_dir), torch_dtype=torch.float32, local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def settings(tmp_path: Path, embedded_model_dir: Path) -> Settings:
    """Settings for one test: its own cache folder, with the embedded model pre-copied."""
    cache = tmp_path / "cache"
    shutil.copytree(embedded_model_dir, cache / "models" / "embedded--tiny-sd")
    return Settings(cache_dir=cache)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The real FastAPI app with its lifespan run: migrated SQLite file, model registered."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """HTTP through the full ASGI stack (Socket.IO wrapper, middleware, routes)."""
    async with http_client(app) as http:
        yield http


@pytest.fixture
async def loaded_client(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """A client whose backend has the embedded model loaded."""
    response = await client.post("/models/load", json={"model_id": EMBEDDED_MODEL_ID})
    assert response.status_code == 200, response.text
    return client


@pytest.fixture
def small_disk_settings(
    tmp_path: Path, embedded_model_dir: Path
) -> Iterator[tuple[Settings, SmallDisk]]:
    """Settings whose whole cache folder (database included) lives on a 24 MiB file system
    the test can fill; the embedded model is pre-copied onto it."""
    with small_disk(tmp_path / "small", 24) as disk:
        cache = disk.root / "cache"
        shutil.copytree(embedded_model_dir, cache / "models" / "embedded--tiny-sd")
        yield Settings(cache_dir=cache), disk


@pytest.fixture
def remote() -> Iterator[FakeRemote]:
    """The fake remote services (files, Hugging Face Hub, CivitAI) on a loopback port."""
    with running_remote() as fake:
        yield fake
