"""A model already in the local Hugging Face cache (downloaded by another tool): it loads by
id, is listed from then on, and deleting it removes the listing, never the shared cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from huggingface_hub import constants

from tests.api import downloaded_models, load_model, post_load

REPO = "test-org/cached-sd15"
COMMIT = "a" * 40


@pytest.fixture
def hub_cache(tmp_path: Path, sd15_repo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache layout huggingface_hub writes (``models--org--name/snapshots/<commit>``,
    ``refs/main``), in a folder of the test's own: HF_HUB_CACHE is read when the library is
    imported, so the setting is changed where the library reads it."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--test-org--cached-sd15"
    shutil.copytree(sd15_repo_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / COMMIT


async def test_a_cached_model_is_listed_once_loaded_and_its_delete_keeps_the_cache(
    client: httpx.AsyncClient, hub_cache: Path
) -> None:
    assert REPO not in await downloaded_models(client)

    await load_model(client, REPO)

    assert (await downloaded_models(client))[REPO] == str(hub_cache)

    assert (await client.post("/models/unload")).status_code == 200
    deleted = await client.delete("/models", params={"model_id": REPO})
    assert deleted.status_code == 200, deleted.text
    assert REPO not in await downloaded_models(client)
    assert (hub_cache / "model_index.json").is_file()  # the shared cache is left alone


async def test_a_model_neither_here_nor_cached_is_a_404(
    client: httpx.AsyncClient, hub_cache: Path
) -> None:
    response = await post_load(client, "test-org/elsewhere")
    assert response.status_code == 404
    assert "test-org/elsewhere" not in await downloaded_models(client)
