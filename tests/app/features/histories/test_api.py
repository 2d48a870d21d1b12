"""History entries through HTTP, stored in the real SQLite file, with real image files."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx

from app.config import EMBEDDED_MODEL_ID, Settings
from app.features.generators.schemas import DEFAULT_NEGATIVE_PROMPT
from tests.api import config_with, create_history, list_histories, load_model, post_generate
from tests.harness import running_app


async def test_needs_a_loaded_model(client: httpx.AsyncClient) -> None:
    response = await client.post("/histories", json={"prompt": "a cat"})
    assert response.status_code == 400
    assert "No model is currently loaded" in response.json()["detail"]
    assert await list_histories(client) == []


async def test_empty_list(client: httpx.AsyncClient) -> None:
    response = await client.get("/histories")
    assert response.status_code == 200
    assert response.json() == []


async def test_listed_oldest_first_with_config_after_defaults(
    loaded_client: httpx.AsyncClient,
) -> None:
    first = await create_history(loaded_client, {"prompt": "first"})
    sent = {
        "prompt": "second",
        "negative_prompt": "",
        "width": 640,
        "height": 768,
        "number_of_images": 4,
        "cfg_scale": 5,
        "steps": 30,
        "seed": 42,
        "sampler": "UniPC",
        "clip_skip": 2,
        "styles": ["fooocus_masterpiece"],
        "loras": [{"lora_id": 3, "weight": 0.8}, {"lora_id": 4}],
        "hires_fix": {
            "upscale_factor": 2,
            "upscaler": "Lanczos",
            "denoising_strength": 0.4,
            "steps": 0,
        },
        "unknown_field": "ignored",
    }
    second = await create_history(loaded_client, sent)
    assert second > first

    histories = await list_histories(loaded_client)
    assert [h["id"] for h in histories] == [first, second]
    old, new = histories
    assert old["prompt"] == "first"
    assert old["model"] == EMBEDDED_MODEL_ID
    assert old["generated_images"] == []
    assert old["config"] == {
        "prompt": "first",
        "negative_prompt": DEFAULT_NEGATIVE_PROMPT,  # omitted: the built-in default
        "width": 512,
        "height": 512,
        "number_of_images": 1,
        "cfg_scale": 7.5,
        "steps": 24,
        "seed": -1,
        "sampler": "EULER_A",
        "clip_skip": 1,
        "styles": [],
        "loras": [],
        "hires_fix": None,
    }
    expected = {k: v for k, v in sent.items() if k != "unknown_field"}
    expected["negative_prompt"] = ""  # sent empty: kept empty, not replaced by the default
    expected["loras"] = [{"lora_id": 3, "weight": 0.8}, {"lora_id": 4, "weight": 1.0}]
    expected["hires_fix"] = {
        "upscale_factor": 2.0,
        "upscaler": "Lanczos",
        "denoising_strength": 0.4,
        "steps": 0,
    }
    assert new["config"] == expected
    for stamp in (new["created_at"], new["updated_at"]):
        parsed = datetime.fromisoformat(stamp)
        assert parsed.tzinfo is None  # naive UTC, as the UI expects


async def test_numeric_strings_are_accepted(loaded_client: httpx.AsyncClient) -> None:
    await create_history(
        loaded_client, {"prompt": "x", "steps": "4", "width": "128", "cfg_scale": "6.5"}
    )
    [history] = await list_histories(loaded_client)
    config = history["config"]
    assert (config["steps"], config["width"], config["cfg_scale"]) == (4, 128, 6.5)


INVALID_FIELDS: list[tuple[str, object]] = [
    ("width", 32),
    ("width", 4096),
    ("height", 63),
    ("number_of_images", 0),
    ("number_of_images", 100),
    ("sampler", "FOO"),
    ("sampler", "euler_a"),
    ("steps", 0),
    ("cfg_scale", 0.5),
    ("clip_skip", 13),
    ("seed", -2),
    ("prompt", "x" * 1001),
]
INVALID_CONFIGS: list[dict[str, Any]] = [
    {},  # no prompt
    {"prompt": "x", "loras": [{"weight": 1.0}]},
    {"prompt": "x", "loras": [{"lora_id": 1, "weight": 2.5}]},
    {"prompt": "x", "hires_fix": {"upscale_factor": 2}},
    {
        "prompt": "x",
        "hires_fix": {
            "upscale_factor": 8,
            "upscaler": "Lanczos",
            "denoising_strength": 0.5,
            "steps": 0,
        },
    },
    {
        "prompt": "x",
        "hires_fix": {
            "upscale_factor": 2,
            "upscaler": "ESRGAN",
            "denoising_strength": 0.5,
            "steps": 0,
        },
    },
]


async def test_invalid_config_is_refused(client: httpx.AsyncClient) -> None:
    # Validation answers before the loaded-model check (422, not 400); one app for all
    # cases keeps this cheap.
    for field, value in INVALID_FIELDS:
        response = await client.post("/histories", json={"prompt": "x", field: value})
        assert response.status_code == 422, (field, value)
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", field], (field, value)
    for config in INVALID_CONFIGS:
        response = await client.post("/histories", json=config)
        assert response.status_code == 422, config
        assert isinstance(response.json()["detail"], list)
    # The counterpart: the limits themselves pass validation (then fail for want of a model).
    edge = {"prompt": "x" * 1000, "width": 64, "height": 2048, "number_of_images": 16}
    assert (await client.post("/histories", json=edge)).status_code == 400


async def test_delete_removes_the_entry_and_its_images(
    loaded_client: httpx.AsyncClient, settings: Settings
) -> None:
    config = config_with(prompt="to delete", number_of_images=2)
    doomed = await create_history(loaded_client, config)
    kept = await create_history(loaded_client, {**config, "prompt": "to keep"})
    paths = {}
    for history_id in (doomed, kept):
        response = await post_generate(loaded_client, config, history_id)
        assert response.status_code == 200, response.text
        paths[history_id] = [item["path"] for item in response.json()["items"]]
    files = {
        history_id: [settings.generated_images_dir / p.rsplit("/", 1)[1] for p in urls]
        for history_id, urls in paths.items()
    }
    assert all(f.is_file() for group in files.values() for f in group)
    listed = {h["id"]: h for h in await list_histories(loaded_client)}
    assert [i["path"] for i in listed[doomed]["generated_images"]] == paths[doomed]

    response = await loaded_client.delete(f"/histories/{doomed}")
    assert response.status_code == 200
    assert isinstance(response.json()["message"], str)
    assert [h["id"] for h in await list_histories(loaded_client)] == [kept]
    assert not any(f.exists() for f in files[doomed])
    assert all(f.is_file() for f in files[kept])  # the other entry's images stay
    for url in paths[doomed]:
        assert (await loaded_client.get(f"/{url}")).status_code == 404

    again = await loaded_client.delete(f"/histories/{doomed}")
    assert again.status_code == 404


async def test_delete_unknown_is_not_found(client: httpx.AsyncClient) -> None:
    response = await client.delete("/histories/12345")
    assert response.status_code == 404
    assert "12345" in response.json()["detail"]
    assert (await client.delete("/histories/abc")).status_code == 422


async def test_start_up_removes_images_that_no_history_records(settings: Settings) -> None:
    # What a crash between writing the PNGs and committing their rows leaves behind: PNGs
    # without rows and temporary files. The next start removes them; recorded images stay.
    async with running_app(settings) as (_, client):
        await load_model(client)
        response = await post_generate(client, config_with(prompt="kept"))
        assert response.status_code == 200, response.text
    [kept] = [item["file_name"] + ".png" for item in response.json()["items"]]
    folder = settings.generated_images_dir
    (folder / "20260101_000000_000000_0.png").write_bytes(b"\x89PNG unrecorded")
    (folder / ".tmp-abc123").write_bytes(b"half a png")
    async with running_app(settings) as (_, client):
        assert sorted(p.name for p in folder.iterdir()) == [kept]
        [history] = await list_histories(client)
        assert [image["file_name"] + ".png" for image in history["generated_images"]] == [kept]
