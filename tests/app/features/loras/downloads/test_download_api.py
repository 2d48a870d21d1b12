"""Adding LoRAs from Hugging Face, CivitAI and plain URLs: the successful paths, what is
stored with them, and the requests refused at once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from app.config import Settings
from tests.api import download_lora, list_loras, start_lora_download, wait_for_lora_download
from tests.app.features.loras.helpers import stored_entries
from tests.fake_remote import FakeRemote, running_remote

HF_FILE = "detail tweaker.safetensors"


async def _source_columns(app: FastAPI, lora_id: int) -> tuple[Any, ...]:
    """(source_url, civitai, source_path) as stored (``source`` is JSON text in SQLite)."""
    async with app.state.session_factory() as session:
        row = await session.execute(
            text("SELECT source, source_path FROM loras WHERE id = :id"), {"id": lora_id}
        )
        source, source_path = row.one()
    stored = json.loads(source) if source is not None else {}
    return stored.get("source_url"), stored.get("civitai"), source_path


def _assert_stored(settings: Settings, lora: dict[str, Any], data: bytes) -> None:
    stored = Path(lora["file_path"])
    assert stored.parent == settings.loras_dir.resolve()
    assert stored.read_bytes() == data
    assert stored_entries(settings) == {stored.name}  # no temporary file left
    assert lora["sha256"] == hashlib.sha256(data).hexdigest()
    assert lora["file_size"] == len(data)


@pytest.mark.parametrize("spelling", ["reference", "blob-url", "resolve-url"])
async def test_hugging_face_file(
    app: FastAPI,
    client: httpx.AsyncClient,
    settings: Settings,
    remote: FakeRemote,
    lora_bytes: dict[str, bytes],
    spelling: str,
) -> None:
    data = lora_bytes["kohya_unet"]
    remote.hugging_face("someone/detail-lora", HF_FILE, data)
    resolve_url = remote.url("/hf/someone/detail-lora/resolve/main/detail%20tweaker.safetensors")
    bodies: dict[str, dict[str, Any]] = {
        "reference": {"huggingface": {"repo_id": "someone/detail-lora", "filename": HF_FILE}},
        "blob-url": {"url": resolve_url.replace("/resolve/", "/blob/")},
        "resolve-url": {"url": resolve_url},
    }
    body = bodies[spelling]

    started = await start_lora_download(client, body)
    assert started["state"] in {"queued", "downloading", "validating"}
    assert (started["source"], started["file_name"]) == ("huggingface", HF_FILE)
    assert started["url"] == resolve_url
    done = await wait_for_lora_download(client, started["id"])

    assert done["state"] == "completed", done
    assert done["bytes_done"] == done["bytes_total"] == len(data)
    assert done["detail"] is None
    lora = done["lora"]
    assert lora["name"] == "detail tweaker"
    _assert_stored(settings, lora, data)
    assert await list_loras(client) == [lora]
    assert [r.path.split("/")[1] for r in remote.requests] == ["hf", "cdn"]  # followed the 302
    assert await _source_columns(app, lora["id"]) == (resolve_url, None, None)
    listed = (await client.get("/loras/downloads")).json()["downloads"]
    assert [d["id"] for d in listed] == [started["id"]]


async def test_token_goes_to_the_service_only(
    client: httpx.AsyncClient, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    with running_remote() as cdn:
        remote.hugging_face(
            "someone/gated", "a.safetensors", lora_bytes["kohya_unet"], token="hf_ok", cdn=cdn
        )
        body = {
            "huggingface": {"repo_id": "someone/gated", "filename": "a.safetensors"},
            "token": "hf_ok",
        }
        done = await download_lora(client, body)
        assert done["state"] == "completed", done
        assert "hf_ok" not in str(done)
        [asked] = remote.requests
        assert asked.headers["Authorization"] == "Bearer hf_ok"
        [fetched] = cdn.requests
        assert "Authorization" not in fetched.headers  # another site: no token


async def test_civitai_version_keeps_its_data_and_trained_words(
    app: FastAPI,
    client: httpx.AsyncClient,
    settings: Settings,
    remote: FakeRemote,
    lora_bytes: dict[str, bytes],
) -> None:
    data = lora_bytes["peft_unet"]
    document = remote.civitai_version(
        4321, data, model_id=77, file_name="boat style.safetensors", token="sekret-123"
    )

    started = await start_lora_download(
        client, {"civitai": {"model_version_id": 4321}, "token": "sekret-123"}
    )
    assert (started["source"], started["file_name"]) == ("civitai", "boat style.safetensors")
    done = await wait_for_lora_download(client, started["id"])

    assert done["state"] == "completed", done
    lora = done["lora"]
    _assert_stored(settings, lora, data)
    assert lora["name"] == "boat style"
    assert lora["trigger_words"] == ["mystyle", "in the style of a boat"]  # the file has none
    source_url, stored, _ = await _source_columns(app, lora["id"])
    assert source_url == remote.url("/civitai/models/77?modelVersionId=4321")
    assert stored["version_id"] == 4321
    assert stored["model_id"] == 77
    assert stored["base_model"] == "SD 1.5"
    assert stored["trained_words"] == document["trainedWords"]
    assert lora["source_url"] == source_url
    assert lora["civitai"] == stored
    assert (await client.get(f"/loras/{lora['id']}")).json()["civitai"] == stored
    assert stored["hashes"]["SHA256"] == hashlib.sha256(data).hexdigest().upper()
    assert "sekret-123" not in str(done)
    assert "token" not in source_url


@pytest.mark.parametrize("page", ["with-version", "latest-version", "download-url"])
async def test_civitai_urls_are_routed(
    client: httpx.AsyncClient,
    remote: FakeRemote,
    lora_bytes: dict[str, bytes],
    page: str,
) -> None:
    newest = remote.civitai_version(
        12, lora_bytes["style_a"], model_id=5, file_name="new.safetensors"
    )
    older = remote.civitai_version(
        11, lora_bytes["style_b"], model_id=5, file_name="old.safetensors"
    )
    remote.civitai_model(5, [newest, older])
    url = {
        "with-version": remote.url("/civitai/models/5/some-slug?modelVersionId=11"),
        "latest-version": remote.url("/civitai/models/5"),
        "download-url": remote.url("/civitai/api/download/models/11"),
    }[page]

    done = await download_lora(client, {"url": url})

    assert done["state"] == "completed", done
    assert done["source"] == "civitai"
    expected = "new" if page == "latest-version" else "old"
    assert done["lora"]["name"] == expected


async def test_plain_url_takes_the_name_the_server_gives(
    client: httpx.AsyncClient, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    url = remote.serve(
        "/get",
        lora_bytes["legacy_unet"],
        disposition="attachment; filename*=UTF-8''Cool%20Style.safetensors",
    )
    done = await download_lora(client, {"url": f"{url}?id=3"})
    assert done["state"] == "completed", done
    assert done["source"] == "url"
    assert done["file_name"] == "Cool Style.safetensors"
    assert done["lora"]["name"] == "Cool Style"


async def test_known_civitai_hash_is_a_conflict_at_once(
    client: httpx.AsyncClient, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    data = lora_bytes["kohya_unet"]
    remote.civitai_version(1, data, file_name="first.safetensors")
    remote.civitai_version(2, data, file_name="again.safetensors")
    first = await download_lora(client, {"civitai": {"model_version_id": 1}})
    assert first["state"] == "completed", first
    remote.requests.clear()

    response = await client.post("/loras/download", json={"civitai": {"model_version_id": 2}})

    assert response.status_code == 409, response.text
    lora = first["lora"]
    assert f"'{lora['name']}' (id {lora['id']})" in response.json()["detail"]
    assert [r.path for r in remote.requests] == ["/civitai/api/v1/model-versions/2"]  # no file
    assert [d["id"] for d in (await client.get("/loras/downloads")).json()["downloads"]] == [
        first["id"]
    ]


async def test_same_content_from_a_plain_url_fails_with_the_upload_conflict(
    client: httpx.AsyncClient, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    data = lora_bytes["kohya_unet"]
    first = await download_lora(client, {"url": remote.serve("/a.safetensors", data)})
    second = await download_lora(client, {"url": remote.serve("/b.safetensors", data)})
    assert second["state"] == "failed"
    lora = first["lora"]
    assert second["detail"] == (
        f"This file is already added as LoRA '{lora['name']}' (id {lora['id']})."
    )
    assert await list_loras(client) == [lora]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"url": "file:///etc/passwd"}, 400, "'file:'"),
        ({"url": "ftp://example.com/a.safetensors"}, 400, "'ftp:'"),
        ({"url": "example.com/a.safetensors"}, 400, "relative"),
        ({"url": "http:///a.safetensors"}, 400, "no host"),
        ({"url": "https://example.com/model.ckpt"}, 400, "pickle"),
        ({"url": "CIVITAI/user/someone"}, 400, "find a civitai model"),
        ({"url": "CIVITAI/models/12?modelVersionId=abc"}, 400, "not a civitai model version"),
        ({"url": "HF/someone/repo"}, 400, "not a hugging face file url"),
        ({"huggingface": {"repo_id": "a/b", "filename": "x.bin"}}, 400, "pickle"),
        ({"huggingface": {"repo_id": "a/b", "filename": "notes.txt"}}, 400, ".safetensors"),
        ({"huggingface": {"repo_id": "a/b", "filename": "../x.safetensors"}}, 400, "not a file"),
        ({"huggingface": {"repo_id": "no-slash", "filename": "x.safetensors"}}, 422, None),
        ({"civitai": {"model_version_id": 0}}, 422, None),
        (
            {"url": "https://example.com/a.safetensors", "civitai": {"model_version_id": 1}},
            422,
            None,
        ),
        ({}, 422, None),
    ],
)
async def test_bad_requests_are_refused_at_once(
    client: httpx.AsyncClient,
    remote: FakeRemote,
    body: dict[str, Any],
    status: int,
    fragment: str | None,
) -> None:
    if isinstance(body.get("url"), str):
        url = (
            body["url"].replace("CIVITAI", remote.url("/civitai")).replace("HF", remote.url("/hf"))
        )
        body = {**body, "url": url}
    response = await client.post("/loras/download", json=body)
    assert response.status_code == status, response.text
    if fragment is not None:
        assert fragment in response.json()["detail"].lower()
    assert remote.requests == []
    assert (await client.get("/loras/downloads")).json() == {"downloads": []}


async def test_unknown_download(client: httpx.AsyncClient) -> None:
    assert (await client.get("/loras/downloads/nope")).status_code == 404
    response = await client.delete("/loras/downloads/nope")
    assert response.status_code == 404
    assert response.json() == {"detail": "LoRA download nope not found"}


async def test_civitai_link_with_its_token(
    client: httpx.AsyncClient, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    remote.civitai_version(21, lora_bytes["kohya_unet"], token="tk-1")
    url = remote.url("/civitai/api/download/models/21?type=Model&token=tk-1")

    done = await download_lora(client, {"url": url})

    assert done["state"] == "completed", done
    assert "tk-1" not in str(done)
    api, link, stored = remote.requests
    assert api.path == "/civitai/api/v1/model-versions/21"
    assert (api.headers["Authorization"], link.headers["Authorization"]) == ("Bearer tk-1",) * 2
    assert stored.path.startswith("/storage/")
