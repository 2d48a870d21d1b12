"""Deleting models: refused while loaded or loading, complete when allowed, and nothing
lost when the database refuses (the folder stays); interrupted deletes are finished at the
next start."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from app.config import EMBEDDED_MODEL_ID, Settings
from tests.api import downloaded_models, post_load
from tests.app.features.models.helpers import pipeline_lock_held, start
from tests.harness import running_app, sqlite_refuses, wait_until


async def test_delete_the_loaded_model_is_a_conflict(
    loaded_client: httpx.AsyncClient, settings: Settings
) -> None:
    response = await loaded_client.delete("/models", params={"model_id": EMBEDDED_MODEL_ID})
    assert response.status_code == 409
    assert isinstance(response.json()["detail"], str)
    assert (settings.models_dir / "embedded--tiny-sd" / "model_index.json").is_file()
    assert list(await downloaded_models(loaded_client)) == [EMBEDDED_MODEL_ID]


async def test_delete_a_loading_model_is_a_conflict(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    with pipeline_lock_held(app) as manager:
        load = start(post_load(client))
        await wait_until(lambda: manager.loading_model_id == EMBEDDED_MODEL_ID)
        response = await client.delete("/models", params={"model_id": EMBEDDED_MODEL_ID})
    assert response.status_code == 409
    assert (await load).status_code == 200
    assert (settings.models_dir / "embedded--tiny-sd").is_dir()


async def test_delete_an_unknown_model_is_a_bad_request(client: httpx.AsyncClient) -> None:
    response = await client.delete("/models/", params={"model_id": "nobody/nothing"})
    assert response.status_code == 400
    assert "nobody/nothing" in response.json()["detail"]


async def test_delete_after_unload_removes_files_and_row(
    loaded_client: httpx.AsyncClient, settings: Settings
) -> None:
    assert (await loaded_client.post("/models/unload")).status_code == 200
    response = await loaded_client.delete("/models", params={"model_id": EMBEDDED_MODEL_ID})
    assert response.status_code == 200, response.text
    assert EMBEDDED_MODEL_ID in response.json()["message"]
    assert not (settings.models_dir / "embedded--tiny-sd").exists()
    assert await downloaded_models(loaded_client) == {}
    # Gone for good: loading it now is "not downloaded", deleting again "unknown".
    assert (await post_load(loaded_client)).status_code == 404
    again = await loaded_client.delete("/models", params={"model_id": EMBEDDED_MODEL_ID})
    assert again.status_code == 400


async def test_a_failed_delete_keeps_the_model_folder(settings: Settings) -> None:
    folder = settings.models_dir / "embedded--tiny-sd"
    async with running_app(settings, raise_app_exceptions=False) as (_, client):
        sqlite_refuses(settings, "DELETE", "models")
        response = await client.delete("/models", params={"model_id": EMBEDDED_MODEL_ID})
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error"}
    assert (folder / "model_index.json").is_file()
    assert [p.name for p in settings.models_dir.iterdir()] == ["embedded--tiny-sd"]


async def test_start_up_removes_folders_of_interrupted_deletes(settings: Settings) -> None:
    leftover = settings.models_dir / ".trash-0123"
    (leftover / "unet").mkdir(parents=True)
    async with running_app(settings):
        assert not leftover.exists()
        assert (settings.models_dir / "embedded--tiny-sd" / "model_index.json").is_file()
