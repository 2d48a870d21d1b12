"""``POST /models/import``: the user's own diffusers folders and single-file checkpoints, in
place and copied, loaded with their configs and generating the images of the diffusers folder
they were written from; what is refused and why; what the user owns is never changed."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.cores.model_manager.single_file import CONFIG_SUFFIXES
from tests.api import config_with, fetch_png, load_model, pixels, post_generate, post_load
from tests.factories.checkpoints import write_checkpoint, write_lora_checkpoint, write_vae_only
from tests.factories.family_models import Family, FamilyModelDir
from tests.fake_remote import FakeRemote
from tests.harness import Event, running_app

JSON = dict[str, Any]
SHAPES: tuple[Family, ...] = ("sd1", "sdxl")


async def import_path(client: httpx.AsyncClient, path: Path | str, **body: Any) -> httpx.Response:
    return await client.post("/models/import", json={"path": str(path), **body})


async def imported(client: httpx.AsyncClient, path: Path | str, **body: Any) -> JSON:
    response = await import_path(client, path, **body)
    assert response.status_code == 200, response.text
    info: JSON = response.json()
    return info


async def listed(client: httpx.AsyncClient) -> dict[str, JSON]:
    response = await client.get("/models/downloaded")
    assert response.status_code == 200, response.text
    return {row["model_id"]: row for row in response.json()}


def fingerprint(path: Path) -> tuple[int, int, str]:
    """What must not change about the user's file: size, mtime and content."""
    info = path.stat()
    return info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


async def first_image(client: httpx.AsyncClient, model_id: str) -> tuple[Any, str]:
    """Load ``model_id``, generate one image; its pixels and its PNG infotext."""
    await load_model(client, model_id)
    response = await post_generate(client, config_with(steps=2, model=model_id))
    image = await fetch_png(client, response.json()["items"][0]["path"])
    return (await pixels(client, response))[0], str(image.info.get("parameters", ""))


@pytest.mark.parametrize("family", SHAPES)
async def test_a_checkpoint_in_place_generates_the_image_of_its_diffusers_folder(
    family: Family, family_model_dir: FamilyModelDir, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    folder = family_model_dir(family, seed=1)
    checkpoint = write_checkpoint(family, tmp_path / "user" / f"My {family}.safetensors", seed=1)
    before = fingerprint(checkpoint)

    folder_info = await imported(client, folder, name=f"{family}-folder")
    assert folder_info["source"] == "import"
    assert folder_info["model_dir"] == str(folder.resolve())
    reference, _ = await first_image(client, f"{family}-folder")

    info = await imported(client, checkpoint, config=str(folder))
    assert info["model_id"] == f"My {family}"  # the file's name without extension
    assert info["model_dir"] == str(checkpoint.resolve())  # in place
    assert info["size"] == checkpoint.stat().st_size
    assert info["family"] == folder_info["family"]
    assert info["missing"] is False
    assert "UNet" in info["evidence"]
    result, infotext = await first_image(client, info["model_id"])
    assert np.array_equal(result, reference)
    short = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert f"Model hash: {short}" in infotext  # A1111's short hash of the file

    assert fingerprint(checkpoint) == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name]


async def test_a_copied_checkpoint_is_loaded_from_the_cache_and_reports_progress(
    family_model_dir: FamilyModelDir,
    client: httpx.AsyncClient,
    settings: Settings,
    emitted: list[Event],
    tmp_path: Path,
) -> None:
    folder = family_model_dir("sd1", seed=1)
    checkpoint = write_checkpoint("sd1", tmp_path / "sd1.safetensors", seed=1)
    before = fingerprint(checkpoint)
    info = await imported(client, checkpoint, name="copied", config=str(folder), copy=True)
    copy = Path(info["model_dir"])
    assert copy.parent == settings.models_dir
    assert copy.read_bytes() == checkpoint.read_bytes()
    assert not [p for p in settings.models_dir.iterdir() if p.name.startswith(".import-")]
    phases = [data["phase"] for name, data in emitted if name == "download_step_progress"]
    assert phases[0] == "init"
    assert phases[-1] == "complete"

    await imported(client, folder, name="folder")
    reference, _ = await first_image(client, "folder")
    copied, _ = await first_image(client, "copied")
    assert np.array_equal(copied, reference)
    assert fingerprint(checkpoint) == before

    await client.post("/models/unload")
    response = await client.delete("/models", params={"model_id": "copied"})
    assert response.status_code == 200, response.text
    assert not copy.exists()  # a copy is ours to remove
    assert fingerprint(checkpoint) == before


async def test_forgetting_an_in_place_import_leaves_the_file(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    checkpoint = write_checkpoint("sd1", tmp_path / "mine.safetensors")
    before = fingerprint(checkpoint)
    await imported(client, checkpoint)
    response = await client.delete("/models", params={"model_id": "mine"})
    assert response.status_code == 200, response.text
    assert "mine" not in await listed(client)
    assert fingerprint(checkpoint) == before
    await imported(client, checkpoint)  # and it can be imported again


async def test_a_moved_away_file_shows_as_missing_and_does_not_load(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    checkpoint = write_checkpoint("sd1", tmp_path / "moving.safetensors")
    await imported(client, checkpoint)
    elsewhere = checkpoint.rename(tmp_path / "elsewhere.safetensors")
    row = (await listed(client))["moving"]
    assert row["missing"] is True
    response = await post_load(client, "moving")
    assert response.status_code == 404, response.text
    assert "missing" in response.json()["detail"]
    elsewhere.rename(checkpoint)
    assert (await listed(client))["moving"]["missing"] is False


async def test_the_same_content_twice_is_a_conflict_naming_the_model(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    checkpoint = write_checkpoint("sd1", tmp_path / "first.safetensors")
    await imported(client, checkpoint)
    twin = tmp_path / "second.safetensors"
    shutil.copyfile(checkpoint, twin)
    response = await import_path(client, twin)
    assert response.status_code == 409, response.text
    assert "'first'" in response.json()["detail"]
    response = await import_path(client, checkpoint, name="again", copy=True)
    assert response.status_code == 409


async def test_a_known_hash_is_not_computed_again_after_a_restart(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    checkpoint = write_checkpoint("sd1", tmp_path / "cached.safetensors")
    await imported(client, checkpoint)
    async with running_app(settings) as (_app, again):
        response = await import_path(again, checkpoint, name="cached-again")
    assert response.status_code == 409  # found by the hash remembered for (path, size, mtime)
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10))
    async with running_app(settings) as (_app, again):
        response = await import_path(again, checkpoint, name="cached-again")
    assert response.status_code == 409  # hashed again: the same content


def _pickle(path: Path) -> Path:
    path.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    return path


def _truncated(path: Path) -> Path:
    whole = write_checkpoint("sd1", path.with_name("whole.safetensors"))
    path.write_bytes(whole.read_bytes()[:200])
    return path


def _no_index(path: Path) -> Path:
    path.mkdir()
    (path / "unet").mkdir()
    (path / "unet" / "config.json").write_text("{}")
    return path


REFUSALS = [
    pytest.param(
        lambda p: write_lora_checkpoint(p / "lora.safetensors"), "/loras/upload", id="lora"
    ),
    pytest.param(lambda p: write_vae_only(p / "vae.safetensors"), "VAE alone", id="vae"),
    pytest.param(lambda p: _pickle(p / "model.ckpt"), "pickle", id="pickle"),
    pytest.param(lambda p: _pickle(p / "model.safetensors"), "pickle", id="pickle-renamed"),
    pytest.param(lambda p: _truncated(p / "cut.safetensors"), "truncated", id="truncated"),
    pytest.param(lambda p: _no_index(p / "folder"), "model_index.json", id="no-model-index"),
    pytest.param(lambda p: p / "nothing.safetensors", "does not exist", id="no-file"),
]


@pytest.mark.parametrize(("write", "said"), REFUSALS)
async def test_what_is_not_a_full_model_is_refused_with_what_it_is(
    write: Any, said: str, client: httpx.AsyncClient, app: FastAPI, tmp_path: Path
) -> None:
    path = write(tmp_path)
    before = fingerprint(path) if path.is_file() else None
    response = await import_path(client, path)
    assert response.status_code == 400, response.text
    assert said in response.json()["detail"]
    assert set(await listed(client)) == {"embedded/tiny-sd"}
    if before is not None:
        assert fingerprint(path) == before


async def test_a_config_folder_of_another_family_is_refused(
    family_model_dir: FamilyModelDir, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    checkpoint = write_checkpoint("sd1", tmp_path / "sd1.safetensors")
    response = await import_path(client, checkpoint, config=str(family_model_dir("sdxl")))
    assert response.status_code == 400, response.text
    assert "config folder" in response.json()["detail"]


async def test_a_checkpoint_without_config_uses_a_model_of_its_family_on_the_machine(
    family_model_dir: FamilyModelDir, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    folder = family_model_dir("sdxl", seed=1)
    checkpoint = write_checkpoint("sdxl", tmp_path / "xl.safetensors", seed=1)
    await imported(client, folder, name="xl-folder")
    reference, _ = await first_image(client, "xl-folder")
    await imported(client, checkpoint)
    result, _ = await first_image(client, "xl")
    assert np.array_equal(result, reference)


async def test_without_configs_offline_the_load_names_the_family_and_what_to_fetch(
    settings: Settings, tmp_path: Path
) -> None:
    offline = settings.model_copy(
        update={"huggingface_base_url": "http://127.0.0.1:9", "lora_download_attempts": 1}
    )
    checkpoint = write_checkpoint("sdxl", tmp_path / "lonely.safetensors")
    async with running_app(offline) as (_app, client):
        await imported(client, checkpoint, config="someone/sdxl-configs")
        response = await post_load(client, "lonely")
        assert 400 <= response.status_code < 500, response.text
        detail = response.json()["detail"]
        assert "someone/sdxl-configs" in detail
        assert "SDXL" in detail
        assert (await listed(client))["lonely"]["missing"] is False


async def test_configs_named_by_hub_repo_are_fetched_once_and_only_configs(
    family_model_dir: FamilyModelDir, settings: Settings, remote: FakeRemote, tmp_path: Path
) -> None:
    repo = remote.hub_repo("test-org/tiny-sdxl", family_model_dir("sdxl", seed=0))
    online = settings.model_copy(update={"huggingface_base_url": remote.url("/hub")})
    checkpoint = write_checkpoint("sdxl", tmp_path / "xl.safetensors", seed=1)
    async with running_app(online) as (_app, client):
        await imported(client, checkpoint, config="test-org/tiny-sdxl")
        result, _ = await first_image(client, "xl")
        fetched = repo.fetched_files()
        assert "model_index.json" in fetched
        assert "unet/config.json" in fetched
        assert all(name.endswith(CONFIG_SUFFIXES) for name in fetched)
        cached = settings.models_dir / ".configs" / "test-org--tiny-sdxl"
        assert (cached / "scheduler" / "scheduler_config.json").is_file()
        await client.post("/models/unload")
        await load_model(client, "xl")
        assert repo.fetched_files() == fetched  # fetched once
        await imported(client, family_model_dir("sdxl", seed=1), name="xl-folder")
        reference, _ = await first_image(client, "xl-folder")
    assert np.array_equal(result, reference)  # every weight came from the file


async def test_a_copied_diffusers_folder_is_listed_from_the_cache_and_loads(
    family_model_dir: FamilyModelDir, client: httpx.AsyncClient, settings: Settings
) -> None:
    folder = family_model_dir("sd1", seed=2)
    info = await imported(client, folder, name="team/copied-folder", copy=True)
    copy = Path(info["model_dir"])
    assert copy == settings.models_dir / "team--copied-folder"
    assert (copy / "model_index.json").is_file()
    assert info["size"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert (await load_model(client, "team/copied-folder"))["model_id"] == "team/copied-folder"
