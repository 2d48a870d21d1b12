"""``GET /models/search`` and ``GET /models/details`` (CONTRACT §3.3), proxied to a fake Hub."""

from __future__ import annotations

from pathlib import Path

import httpx

from app.config import Settings
from tests.fake_remote import FakeRemote, closed_port_url
from tests.harness import running_app


async def test_search_lists_text_to_image_models_and_marks_those_here(
    client: httpx.AsyncClient, remote: FakeRemote, sd15_repo_dir: Path
) -> None:
    remote.hub_repo("test-org/tiny-sd15", sd15_repo_dir, likes=5, downloads=100)
    remote.hub_search_entry("someone/popular-sd", likes=900, downloads=5000, trending_score=7)
    remote.hub_search_entry("someone/an-llm", likes=999, pipeline_tag="text-generation")
    assert (await client.post("/downloads", json={"model_id": "test-org/tiny-sd15"})).is_success

    response = await client.get("/models/search", params={"model_name": "sd"})

    assert response.status_code == 200, response.text
    found = response.json()["models_search_info"]
    assert [entry["id"] for entry in found] == ["someone/popular-sd", "test-org/tiny-sd15"]
    popular, tiny = found
    assert popular == {
        "id": "someone/popular-sd",
        "author": "someone",
        "likes": 900,
        "trending_score": 7,
        "downloads": 5000,
        "tags": ["diffusers", "safetensors", "text-to-image"],
        "is_downloaded": False,
        "size_mb": None,
        "description": None,
    }
    assert tiny["is_downloaded"] is True
    assert tiny["likes"] == 5
    query = next(r for r in remote.requests if r.path.startswith("/hub/api/models?"))
    assert "pipeline_tag=text-to-image" in query.path
    assert "library=diffusers" in query.path
    assert "sort=likes" in query.path


async def test_search_sorts_and_limits_as_asked(
    client: httpx.AsyncClient, remote: FakeRemote
) -> None:
    for name, downloads in (("a", 10), ("b", 30), ("c", 20)):
        remote.hub_search_entry(f"org/{name}", downloads=downloads)
    response = await client.get("/models/search", params={"sort": "downloads", "limit": 2})
    assert [m["id"] for m in response.json()["models_search_info"]] == ["org/b", "org/c"]
    refused = await client.get("/models/search", params={"sort": "stars"})
    assert refused.status_code == 422


async def test_details_pass_the_hub_info_through_with_file_sizes(
    client: httpx.AsyncClient, remote: FakeRemote, sd15_repo_dir: Path
) -> None:
    repo = remote.hub_repo("test-org/tiny-sd15", sd15_repo_dir, likes=5, downloads=100)

    response = await client.get("/models/details", params={"model_id": "test-org/tiny-sd15"})

    assert response.status_code == 200, response.text
    details = response.json()
    assert details["id"] == "test-org/tiny-sd15"
    assert details["author"] == "test-org"
    assert (details["likes"], details["downloads"]) == (5, 100)
    assert details["is_downloaded"] is False
    assert details["sha"] == repo.commit  # passed through as the Hub sent it
    sizes = {sibling["rfilename"]: sibling["size"] for sibling in details["siblings"]}
    assert sizes == {name: file.size for name, file in repo.files.items()}
    assert repo.fetched_files() == []  # details never download


async def test_details_of_an_unknown_model_is_a_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/models/details", params={"model_id": "nobody/nothing"})
    assert response.status_code == 404
    assert "does not exist" in response.json()["detail"]
    for bad_id in ("../etc/passwd", "org/a..b", "org--a/b", "org/a/b", "no-owner"):
        bad = await client.get("/models/details", params={"model_id": bad_id})
        assert bad.status_code == 422, bad_id


async def test_the_hub_out_of_reach_is_a_502_that_says_so(settings: Settings) -> None:
    offline = settings.model_copy(update={"huggingface_base_url": closed_port_url("")})
    async with running_app(offline) as (_app, client):
        for path, params in (
            ("/models/search", {}),
            ("/models/details", {"model_id": "org/model"}),
        ):
            response = await client.get(path, params=params)
            assert response.status_code == 502, path
            assert "Could not connect" in response.json()["detail"]
