"""Listing, loading, unloading and deleting models, with the real tiny pipeline.

Several tests here need a load to be *in progress* when the next request reaches the model
manager. A real load of the tiny model takes well under 0.1 s, so rather than racing it,
those tests hold the manager's real pipeline lock (``ModelManager.held()``) while they stage
the requests. Every pipeline operation takes that lock inside its worker thread *after* the
request has claimed its place in the "latest request wins" order on the event loop, so with
the lock held each request's worker waits at a known point, and the order in which the
requests reached the manager is exactly the order the test created: ``wait_until`` observes
each request's synchronous bookkeeping (``loading_model_id``) before the next one is sent.
Releasing the lock then lets the workers decide, and "the latest request wins" fixes the
outcome.

Why not simply ``asyncio.gather(load, unload)``: a load awaits a database lookup (and
FastAPI runs the app's plain ``def`` dependencies in the thread pool) before it reaches the
manager, so an unload sent a moment later can get there first; the manager then sees
"unload, load", the load wins and the model ends up loaded.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import EMBEDDED_MODEL_ID, Settings
from app.cores.model_manager.model_manager import ModelManager
from app.database import crud
from tests.api import create_history, list_histories, post_load
from tests.app.features.models.helpers import pipeline_lock_held, start
from tests.harness import recorded_events, wait_until

COPY_ID = "tests/tiny-sd-copy"


async def _register_copy(app: FastAPI, settings: Settings) -> Path:
    """A second real model: a copy of the embedded model's folder, registered in the DB."""
    folder = settings.models_dir / COPY_ID.replace("/", "--")
    shutil.copytree(settings.models_dir / "embedded--tiny-sd", folder)
    async with app.state.session_factory() as session:
        await crud.upsert_model(session, COPY_ID, str(folder))
        await session.commit()
    return folder


async def _nothing_loaded(client: httpx.AsyncClient) -> bool:
    """Observed through the API: creating a history needs a loaded model."""
    response = await client.post("/histories", json={"prompt": "probe"})
    if response.status_code == 400:
        return True
    assert response.status_code == 200, response.text
    return False


# --- listing -----------------------------------------------------------------------------


async def test_embedded_model_is_listed(client: httpx.AsyncClient, settings: Settings) -> None:
    response = await client.get("/models/downloaded")
    assert response.status_code == 200
    [row] = response.json()
    assert row["model_id"] == EMBEDDED_MODEL_ID
    assert isinstance(row["id"], int)
    model_dir = Path(row["model_dir"])
    assert (model_dir / "model_index.json").is_file()
    assert model_dir.resolve() == (settings.models_dir / "embedded--tiny-sd").resolve()
    for stamp in (row["created_at"], row["updated_at"]):
        assert "+" not in stamp
        assert not stamp.endswith("Z")  # naive UTC, as the UI parses it
    assert (row["source"], row["family"], row["missing"]) == ("embedded", "tiny", False)


# --- loading -----------------------------------------------------------------------------


async def test_load_answers_with_the_model_description(client: httpx.AsyncClient) -> None:
    response = await post_load(client)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == EMBEDDED_MODEL_ID
    assert body["sample_size"] == 8  # the tiny UNet's latent size
    assert {"unet", "vae", "text_encoder", "scheduler"} <= set(body["config"])
    assert not await _nothing_loaded(client)


async def test_loading_the_loaded_model_again_returns_at_once(
    loaded_client: httpx.AsyncClient, app: FastAPI
) -> None:
    # Even while a generation holds the pipeline: the answer needs no lock.
    with recorded_events(app) as events, app.state.model_manager.held():
        response = await post_load(loaded_client)
    assert response.status_code == 200
    assert response.json()["model_id"] == EMBEDDED_MODEL_ID
    assert events == []  # not reloaded: no model_load_* events


async def test_switching_to_another_model_replaces_the_loaded_one(
    loaded_client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    await _register_copy(app, settings)
    response = await post_load(loaded_client, COPY_ID)
    assert response.status_code == 200, response.text
    assert response.json()["model_id"] == COPY_ID
    assert app.state.model_manager.loaded_model_id == COPY_ID
    history_id = await create_history(loaded_client, {"prompt": "x"})
    [history] = [h for h in await list_histories(loaded_client) if h["id"] == history_id]
    assert history["model"] == COPY_ID


async def test_unknown_model_is_not_found(client: httpx.AsyncClient) -> None:
    response = await post_load(client, "nobody/no-such-model")
    assert response.status_code == 404
    assert "nobody/no-such-model" in response.json()["detail"]
    assert await _nothing_loaded(client)


async def test_registered_model_without_files_is_not_found(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    shutil.rmtree(settings.models_dir / "embedded--tiny-sd")
    response = await post_load(client)
    assert response.status_code == 404
    assert "missing" in response.json()["detail"]
    assert await _nothing_loaded(client)


@pytest.mark.parametrize("body", [{}, {"model_id": ""}])
async def test_load_needs_a_model_id(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    assert (await client.post("/models/load", json=body)).status_code == 422


# --- unloading ---------------------------------------------------------------------------


async def test_unload_when_nothing_is_loaded(client: httpx.AsyncClient) -> None:
    response = await client.post("/models/unload")
    assert response.status_code == 200
    assert response.json() == {"message": "Model unloaded successfully"}


async def test_unload_releases_the_model(loaded_client: httpx.AsyncClient) -> None:
    assert not await _nothing_loaded(loaded_client)
    assert (await loaded_client.post("/models/unload")).status_code == 200
    assert await _nothing_loaded(loaded_client)


async def test_unload_during_a_load_cancels_it(client: httpx.AsyncClient, app: FastAPI) -> None:
    with pipeline_lock_held(app) as manager:
        load = start(post_load(client))
        await wait_until(lambda: manager.loading_model_id == EMBEDDED_MODEL_ID)
        unload = start(client.post("/models/unload"))
        await wait_until(lambda: manager.loading_model_id is None)
    load_response, unload_response = await asyncio.gather(load, unload)
    assert load_response.status_code == 204
    assert load_response.content == b""
    assert unload_response.status_code == 200
    assert manager.loaded_model_id is None
    assert await _nothing_loaded(client)


async def test_unload_cancels_a_load_that_is_already_running(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    # No lock games: the unload arrives after the load's worker has started for real. The load
    # then stops at its next checkpoint (or, if it already finished, the unload releases it).
    manager: ModelManager = app.state.model_manager
    load = start(post_load(client))
    # (``load.done()`` only guards against a stalled event loop missing the whole load.)
    await wait_until(lambda: manager.loading_model_id == EMBEDDED_MODEL_ID or load.done())
    unload_response = await client.post("/models/unload")
    load_response = await load
    assert unload_response.status_code == 200
    assert load_response.status_code in (200, 204)
    assert manager.loaded_model_id is None
    assert await _nothing_loaded(client)


async def test_two_loads_of_the_same_model_one_waits_for_nothing(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    with pipeline_lock_held(app) as manager:
        first = start(post_load(client))
        second = start(post_load(client))
        await wait_until(lambda: first.done() or second.done(), what="one load answered")
        # The one that reached the manager second found the model loading: 204 at once.
        [duplicate] = [load for load in (first, second) if load.done()]
        assert duplicate.result().status_code == 204
        assert manager.loading_model_id == EMBEDDED_MODEL_ID
    statuses = sorted(r.status_code for r in await asyncio.gather(first, second))
    assert statuses == [200, 204]
    assert manager.loaded_model_id == EMBEDDED_MODEL_ID


async def test_load_unload_load_ends_loaded(client: httpx.AsyncClient, app: FastAPI) -> None:
    # React's development double-mount: load, unload, load, fired without waiting.
    manager: ModelManager = app.state.model_manager

    async def staged() -> list[httpx.Response]:
        with pipeline_lock_held(app):
            first = start(post_load(client))
            await wait_until(lambda: manager.loading_model_id == EMBEDDED_MODEL_ID)
            unload = start(client.post("/models/unload"))
            await wait_until(lambda: manager.loading_model_id is None)
            second = start(post_load(client))
            await wait_until(lambda: manager.loading_model_id == EMBEDDED_MODEL_ID)
        return list(await asyncio.gather(first, unload, second))

    first, unload, second = await staged()
    assert [first.status_code, unload.status_code, second.status_code] == [204, 200, 200]
    assert second.json()["model_id"] == EMBEDDED_MODEL_ID
    assert manager.loaded_model_id == EMBEDDED_MODEL_ID
    assert not await _nothing_loaded(client)


async def test_load_unload_load_gathered_ends_loaded(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    # The same pattern as the UI fires it, without holding anything: whatever order the
    # three requests reach the manager in (the unload has the shortest way there), the last
    # load is never cancelled by the unload that was sent before it.
    async def later(delay_turns: int, request: Coroutine[Any, Any, Any]) -> httpx.Response:
        for _ in range(delay_turns):
            await asyncio.sleep(0)
        response: httpx.Response = await request
        return response

    responses = await asyncio.gather(
        later(0, post_load(client)),
        later(1, client.post("/models/unload")),
        later(2, post_load(client)),
    )
    statuses = [r.status_code for r in responses]
    assert statuses[1] == 200
    assert set(statuses[0::2]) <= {200, 204}
    assert 200 in statuses[0::2]
    assert app.state.model_manager.loaded_model_id == EMBEDDED_MODEL_ID
    assert not await _nothing_loaded(client)


SEQUENCES = [
    ("unload", "load"),
    ("unload", "load", "load"),
    ("load", "unload", "load"),
    ("unload", "load", "unload", "load"),
    ("load", "load", "unload"),
    ("load", "unload"),
]


@pytest.mark.parametrize("start_loaded", [True, False], ids=["from-loaded", "from-empty"])
@pytest.mark.parametrize("sequence", SEQUENCES, ids=["-".join(s) for s in SEQUENCES])
async def test_the_latest_request_wins_at_any_spacing(
    client: httpx.AsyncClient, app: FastAPI, sequence: tuple[str, ...], start_loaded: bool
) -> None:
    # The UI after a window reload: unload, then at once load the same model. Whatever the
    # gaps between the requests (so whatever each one finds the manager doing), the model
    # ends in the state the last request asked for, and no request fails.
    manager: ModelManager = app.state.model_manager
    for gap_ms in (0, 3, 10):
        if start_loaded:
            assert (await post_load(client)).status_code == 200
        else:
            assert (await client.post("/models/unload")).status_code == 200
        tasks: list[asyncio.Task[httpx.Response]] = []
        for index, kind in enumerate(sequence):
            if index:
                await asyncio.sleep(gap_ms / 1000)  # spacing only: nothing waits on it
            request = post_load(client) if kind == "load" else client.post("/models/unload")
            tasks.append(start(request))
        responses = await asyncio.gather(*tasks)
        statuses = [r.status_code for r in responses]
        for kind, status in zip(sequence, statuses, strict=True):
            assert status in ((200, 204) if kind == "load" else (200,)), (gap_ms, statuses)
        if sequence[-1] == "load":
            # A 204 for the last load means an earlier load of the same model was under
            # way and loads it: one of them answered 200.
            assert 200 in [s for k, s in zip(sequence, statuses, strict=True) if k == "load"]
            assert manager.loaded_model_id == EMBEDDED_MODEL_ID, (gap_ms, statuses)
            assert not await _nothing_loaded(client)
        else:
            assert manager.loaded_model_id is None, (gap_ms, statuses)
            assert await _nothing_loaded(client)


async def test_a_load_of_another_model_cancels_the_running_one(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    # The UI switching models while the first one is still loading.
    await _register_copy(app, settings)
    with pipeline_lock_held(app) as manager:
        first = start(post_load(client))
        await wait_until(lambda: manager.loading_model_id == EMBEDDED_MODEL_ID)
        second = start(post_load(client, COPY_ID))
        await wait_until(lambda: manager.loading_model_id == COPY_ID)
    first_response, second_response = await asyncio.gather(first, second)
    assert first_response.status_code == 204
    assert second_response.status_code == 200
    assert second_response.json()["model_id"] == COPY_ID
    assert manager.loaded_model_id == COPY_ID


async def test_a_broken_model_fails_with_a_server_error(
    loaded_client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    folder = await _register_copy(app, settings)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    response = await post_load(loaded_client, COPY_ID)
    assert response.status_code == 500
    assert COPY_ID in response.json()["detail"]
    manager: ModelManager = app.state.model_manager
    assert manager.loading_model_id is None
    # The previous model was released before the failed attempt; nothing is half-loaded.
    assert manager.loaded_model_id is None
    assert (await post_load(loaded_client)).status_code == 200  # and loading still works


async def test_load_then_unload_sent_together_ends_unloaded(client: httpx.AsyncClient) -> None:
    # Both requests start in this order on one event loop: the load takes its place in the
    # "latest request wins" order on arrival, before its database lookup, so the unload
    # that arrives right after it wins.
    load, unload = await asyncio.gather(
        post_load(client),
        client.post("/models/unload"),
    )
    assert unload.status_code == 200
    assert load.status_code == 204
    assert await _nothing_loaded(client)
