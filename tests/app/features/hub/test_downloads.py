"""``POST /downloads`` (CONTRACT §3.4) against a fake Hub serving repositories built offline:
only the pipeline's files are fetched, progress arrives in order, the model lists, loads and
generates; drops resume; cancel, failures and a full disk leave nothing behind."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from app.config import EMBEDDED_MODEL_ID, Settings
from tests.api import Pixels, download_model, downloaded_models, image, load_model
from tests.fake_hub import HubRepo
from tests.fake_remote import FakeRemote, closed_port_url
from tests.harness import Event, SmallDisk, running_app, wait_until

REPO = "test-org/tiny-sd15"


def pipeline_files(repo: HubRepo, *, fp16: bool = False) -> set[str]:
    """What a CPU download must fetch: the plain weights, never a variant, never a decoy."""
    return {
        name
        for name, file in repo.files.items()
        if not file.decoy
        and ("/" in name or name == "model_index.json")
        and (".fp16." in name) == (fp16 and name.endswith(".safetensors"))
    }


def leftovers(settings: Settings) -> list[str]:
    return [p.name for p in settings.models_dir.iterdir() if p.name.startswith(".download-")]


async def test_a_download_fetches_only_the_pipeline_and_the_model_generates(
    client: httpx.AsyncClient,
    remote: FakeRemote,
    sd15_repo_dir: Path,
    settings: Settings,
    emitted: list[Event],
) -> None:
    repo = remote.hub_repo(REPO, sd15_repo_dir)
    assert repo.decoys  # a root checkpoint, .bin twins, README: never to be fetched

    response = await download_model(client, REPO)

    assert response.status_code == 200, response.text
    body = response.json()
    folder = settings.models_dir / "test-org--tiny-sd15"
    assert body == {
        "model_id": REPO,
        "path": str(folder),
        "message": f"Model {REPO} downloaded successfully.",
    }
    assert set(repo.fetched_files()) == pipeline_files(repo)
    for name in pipeline_files(repo):
        assert (folder / name).read_bytes() == repo.files[name].served.data, name
    assert leftovers(settings) == []
    assert (await downloaded_models(client))[REPO] == str(folder)
    _assert_progress(emitted, repo)

    embedded = await _first_image(client, EMBEDDED_MODEL_ID)
    downloaded = await _first_image(client, REPO)
    assert downloaded.shape == embedded.shape
    assert not np.array_equal(downloaded, embedded)


def _assert_progress(events: list[Event], repo: HubRepo) -> None:
    names = [name for name, _ in events if name.startswith("download_")]
    assert names[0] == "download_start"
    assert names[-1] == "download_completed"
    assert set(names[1:-1]) == {"download_step_progress"}
    steps = [data for name, data in events if name == "download_step_progress"]
    expected_files = pipeline_files(repo)
    total = sum(repo.files[name].size for name in expected_files)
    assert all(step["model_id"] == REPO for step in steps)
    assert all(step["total"] == len(expected_files) for step in steps)
    assert all(step["total_downloaded_size"] == total for step in steps)
    sizes = [step["downloaded_size"] for step in steps]
    assert sizes == sorted(sizes), "bytes went backwards"
    assert [step["step"] for step in steps] == sorted(step["step"] for step in steps)
    assert steps[0]["phase"] == "init"
    assert steps[-1] | {"current_file": None} == {
        "model_id": REPO,
        "step": len(expected_files),
        "total": len(expected_files),
        "downloaded_size": total,
        "total_downloaded_size": total,
        "phase": "complete",
        "current_file": None,
    }
    started = [s["current_file"] for s in steps if s["phase"] == "file_start"]
    assert sorted(started) == sorted(expected_files)


async def _first_image(client: httpx.AsyncClient, model_id: str) -> Pixels:
    await load_model(client, model_id)
    return await image(client, seed=77)


async def test_the_sdxl_repo_downloads_loads_and_generates(
    client: httpx.AsyncClient, remote: FakeRemote, sdxl_repo_dir: Path
) -> None:
    repo = remote.hub_repo("test-org/tiny-sdxl", sdxl_repo_dir)
    response = await download_model(client, "test-org/tiny-sdxl")
    assert response.status_code == 200, response.text
    assert set(repo.fetched_files()) == pipeline_files(repo)
    pixels = await _first_image(client, "test-org/tiny-sdxl")
    assert pixels.shape == (64, 64, 3)


async def test_a_dropped_connection_resumes_where_it_stopped(
    client: httpx.AsyncClient, remote: FakeRemote, sd15_repo_dir: Path, settings: Settings
) -> None:
    repo = remote.hub_repo(REPO, sd15_repo_dir)
    weights = "unet/diffusion_pytorch_model.safetensors"
    repo.configure(weights, drop_after=repo.files[weights].size // 2, chunk=4096)

    response = await download_model(client, REPO)

    assert response.status_code == 200, response.text
    folder = settings.models_dir / "test-org--tiny-sd15"
    assert (folder / weights).read_bytes() == repo.files[weights].served.data
    ranges = [
        r.headers.get("Range")
        for r in remote.requests
        if r.method == "GET" and r.path.endswith(weights.split("/")[-1])
    ]
    assert any(value and value.startswith("bytes=") and value != "bytes=0-" for value in ranges)


async def test_a_second_request_joins_the_running_download(
    app: FastAPI, client: httpx.AsyncClient, remote: FakeRemote, sd15_repo_dir: Path
) -> None:
    repo = remote.hub_repo(REPO, sd15_repo_dir)
    released = threading.Event()
    repo.configure("unet/config.json", hold=released)
    downloads = app.state.model_downloads
    try:
        first = asyncio.create_task(download_model(client, REPO))
        await wait_until(lambda: "unet/config.json" in repo.fetched_files(), what="held file")
        second = asyncio.create_task(download_model(client, REPO))
        await wait_until(lambda: downloads.waiting(REPO) == 2, what="the second request")
    finally:
        released.set()

    answers = await asyncio.gather(first, second)

    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json() == answers[1].json()
    assert answers[1].json()["message"] == f"Model {REPO} downloaded successfully."
    gets = [r for r in remote.requests if r.method == "GET" and "model_index.json" in r.path]
    assert len(gets) == 1
    assert list(await downloaded_models(client)).count(REPO) == 1


async def test_cancel_stops_the_download_and_leaves_nothing(
    client: httpx.AsyncClient,
    remote: FakeRemote,
    sd15_repo_dir: Path,
    settings: Settings,
    emitted: list[Event],
) -> None:
    repo = remote.hub_repo(REPO, sd15_repo_dir)
    released = threading.Event()
    repo.configure("unet/config.json", hold=released)
    try:
        running = asyncio.create_task(download_model(client, REPO))
        await wait_until(lambda: "unet/config.json" in repo.fetched_files(), what="the held file")
        assert leftovers(settings) != []

        cancelled = await client.delete(f"/downloads/{REPO}")

        assert cancelled.status_code == 200, cancelled.text
        answer = await running
        assert answer.status_code == 409
        assert answer.json() == {"detail": f"The download of {REPO} was cancelled."}
    finally:
        released.set()
    assert leftovers(settings) == []
    assert not (settings.models_dir / "test-org--tiny-sd15").exists()
    assert REPO not in await downloaded_models(client)
    assert ("download_cancelled", {"model_id": REPO}) in emitted
    nothing = await client.delete(f"/downloads/{REPO}")
    assert nothing.status_code == 404


@pytest.mark.parametrize(
    ("model_id", "status", "says"),
    [
        ("test-org/no-such-model", 404, "does not exist"),
        ("test-org/gated-model", 401, "gated"),
    ],
)
async def test_unknown_and_gated_repositories_are_refused(
    client: httpx.AsyncClient,
    remote: FakeRemote,
    sd15_repo_dir: Path,
    settings: Settings,
    model_id: str,
    status: int,
    says: str,
) -> None:
    remote.hub_repo("test-org/gated-model", sd15_repo_dir, gated_token="hf_secret")
    response = await download_model(client, model_id)
    assert response.status_code == status, response.text
    assert says in response.json()["detail"]
    assert leftovers(settings) == []
    assert model_id not in await downloaded_models(client)


async def test_a_gated_repository_downloads_with_its_token(
    client: httpx.AsyncClient, remote: FakeRemote, sd15_repo_dir: Path
) -> None:
    remote.hub_repo("test-org/gated-model", sd15_repo_dir, gated_token="hf_secret")
    response = await download_model(client, "test-org/gated-model", hf_token="hf_secret")
    assert response.status_code == 200, response.text
    wrong = await download_model(client, "test-org/other", hf_token="bad token with spaces")
    assert wrong.status_code == 400


async def test_a_repository_with_only_pickle_weights_is_refused(
    client: httpx.AsyncClient, remote: FakeRemote, sd15_repo_dir: Path, tmp_path: Path
) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(sd15_repo_dir, pickled)
    for weights in (pickled / "unet").glob("*.safetensors"):
        weights.unlink()
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    remote.hub_repo("test-org/pickled", pickled, decoys=False)

    response = await download_model(client, "test-org/pickled")

    assert response.status_code == 400
    assert "only pickle weights for its unet" in response.json()["detail"]


async def test_a_network_failure_is_a_502(settings: Settings) -> None:
    offline = settings.model_copy(update={"huggingface_base_url": closed_port_url("")})
    async with running_app(offline) as (_app, client):
        response = await download_model(client, REPO)
        assert response.status_code == 502
        assert "Could not connect" in response.json()["detail"]
        assert leftovers(offline) == []


async def test_too_little_disk_space_is_a_507_with_the_sizes(
    small_disk_settings: tuple[Settings, SmallDisk], remote: FakeRemote, sd15_repo_dir: Path
) -> None:
    """Checked before the weights are fetched: the disk (24 MiB) cannot hold the model and
    the spare room kept for the database and images."""
    settings, _disk = small_disk_settings
    remote.hub_repo(REPO, sd15_repo_dir)
    hub = settings.model_copy(update={"huggingface_base_url": remote.url("/hub")})
    async with running_app(hub) as (_app, client):
        response = await download_model(client, REPO)
        assert response.status_code == 507, response.text
        detail = response.json()["detail"]
        assert detail.startswith(f"Not enough disk space for {REPO}: its files take ")
        assert "MB are free" in detail
        assert leftovers(hub) == []
        assert REPO not in await downloaded_models(client)


async def test_a_disk_that_fills_during_the_download_is_a_507(
    small_disk_settings: tuple[Settings, SmallDisk], remote: FakeRemote, sd15_repo_dir: Path
) -> None:
    settings, disk = small_disk_settings
    remote.hub_repo(REPO, sd15_repo_dir)
    hub = settings.model_copy(update={"huggingface_base_url": remote.url("/hub")})
    async with running_app(hub) as (_app, client):
        disk.fill()
        response = await download_model(client, REPO)
        disk.free()
        assert response.status_code == 507, response.text
        assert response.json()["detail"].startswith("The disk is full")
        assert leftovers(hub) == []
        assert REPO not in await downloaded_models(client)


async def test_a_downloaded_model_is_deleted_with_its_folder(
    client: httpx.AsyncClient, remote: FakeRemote, sd15_repo_dir: Path, settings: Settings
) -> None:
    remote.hub_repo(REPO, sd15_repo_dir)
    assert (await download_model(client, REPO)).status_code == 200
    again = await download_model(client, REPO)  # already here: no second transfer
    assert again.json()["message"] == f"Model {REPO} is already here."

    deleted = await client.delete("/models", params={"model_id": REPO})

    assert deleted.status_code == 200, deleted.text
    assert REPO not in await downloaded_models(client)
    await wait_until(lambda: not any(settings.models_dir.glob("*tiny-sd15*")), what="removal")


async def test_unfinished_downloads_are_removed_at_start_up(settings: Settings) -> None:
    crashed = settings.models_dir / ".download-0123"
    (crashed / "unet").mkdir(parents=True)
    (crashed / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
    async with running_app(settings):
        assert not crashed.exists()
