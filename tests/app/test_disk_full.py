"""A full disk is the environment, not a bug: every write that cannot happen is a 507 that
says so, nothing of the change is kept (no image without its row, no row without its image,
no temporary file), and the server works again once space is freed. The cache folder, the
database included, lives on a real file system of a few MiB that the tests fill."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from app.config import Settings
from tests.api import config_with, create_history, list_histories, load_model, post_generate
from tests.harness import SmallDisk, running_app


def assert_disk_full(response: httpx.Response) -> None:
    assert response.status_code == 507, response.text
    assert response.json()["detail"].startswith("The disk is full:")


def image_files(settings: Settings) -> set[str]:
    return {entry.name for entry in settings.generated_images_dir.iterdir()}


def recorded_images(entries: list[dict[str, Any]]) -> set[str]:
    return {
        image["path"].rsplit("/", 1)[-1] for entry in entries for image in entry["generated_images"]
    }


async def test_images_on_a_full_disk_keep_nothing_and_work_once_space_is_freed(
    small_disk_settings: tuple[Settings, SmallDisk], tmp_path: Path
) -> None:
    settings, disk = small_disk_settings
    # The database elsewhere: saving the PNGs is what fails here (the next test fills the
    # database's disk).
    settings = settings.model_copy(
        update={"database_url": f"sqlite+aiosqlite:///{tmp_path / 'elsewhere.db'}"}
    )
    async with running_app(settings) as (_app, client):
        await load_model(client)
        config = config_with(number_of_images=3)
        history_id = await create_history(client, config)
        disk.fill()

        assert_disk_full(await post_generate(client, config, history_id))
        assert image_files(settings) == set()  # no PNG, no temporary file
        disk.free()
        assert await list_histories(client) == []  # as after any failed run: its entry is gone

        response = await post_generate(client, config)
        assert response.status_code == 200, response.text
        assert image_files(settings) == recorded_images(await list_histories(client))
        assert len(image_files(settings)) == 3


async def test_a_database_write_on_a_full_disk_is_a_507_and_leaves_no_row(
    small_disk_settings: tuple[Settings, SmallDisk],
) -> None:
    settings, disk = small_disk_settings
    async with running_app(settings) as (_app, client):
        await load_model(client)
        disk.fill()
        long_prompt = config_with(prompt="a very long prompt " * 50)
        assert_disk_full(await client.post("/histories", json=long_prompt))
        disk.free()
        assert await list_histories(client) == []
        history_id = await create_history(client, long_prompt)
        assert [e["id"] for e in await list_histories(client)] == [history_id]


async def test_saving_settings_on_a_full_disk_is_a_507_and_keeps_the_old_ones(
    small_disk_settings: tuple[Settings, SmallDisk],
) -> None:
    settings, disk = small_disk_settings
    async with running_app(settings) as (_app, client):
        before = (await client.get("/config")).json()
        disk.fill()
        response = await client.put("/config/safety-check", json={"enabled": False})
        assert_disk_full(response)
        disk.free()
        assert (await client.get("/config")).json() == before
        assert [p.name for p in settings.cache_dir.iterdir() if p.name.startswith(".tmp-")] == []
