"""Who may drive the server (issue 12): web pages on other origins, and pages reached through
a DNS-rebinding name, can neither read nor change anything; the desktop UI (development
server on localhost, packaged renderer on ``app://-``), scripts and curl work as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
from diffusers import StableDiffusionPipeline

from app.config import Settings
from tests.api import BASE_CONFIG, create_history, upload_lora
from tests.factories.lora_files import write_lora
from tests.harness import WAIT_TIMEOUT, connect, running_app, socket_client

ALLOWED_BY_DEFAULT = [
    "http://localhost:3000",  # the UI's development server
    "https://localhost",
    "http://127.0.0.1:8000",
    "http://[::1]:5173",
    "app://-",  # the packaged Electron renderer
]
FOREIGN = ["https://evil.example", "null", "http://localhost.evil.example", "file://"]
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


def refusal(origin: str) -> dict[str, str]:
    return {"detail": f"Origin {origin} is not allowed; add it to LOCALAI_ALLOWED_ORIGINS"}


def assert_cors(response: httpx.Response, origin: str) -> None:
    assert response.headers["access-control-allow-origin"] == origin
    assert response.headers["access-control-allow-credentials"] == "true"


def assert_refused_origin(response: httpx.Response, origin: str) -> None:
    assert response.status_code == 403, response.text
    assert response.json() == refusal(origin)
    assert not [name for name in response.headers if name.startswith("access-control-")]


@pytest.mark.parametrize("origin", ALLOWED_BY_DEFAULT)
async def test_the_ui_origins_are_served_with_cors(
    loaded_client: httpx.AsyncClient, origin: str
) -> None:
    client = loaded_client
    got = await client.get("/histories", headers={"Origin": origin})
    assert got.status_code == 200
    assert_cors(got, origin)

    preflight = await client.options("/histories", headers={"Origin": origin, **PREFLIGHT})
    assert preflight.status_code == 200
    assert_cors(preflight, origin)
    assert "POST" in preflight.headers["access-control-allow-methods"]

    posted = await client.post("/histories", json=BASE_CONFIG, headers={"Origin": origin})
    assert posted.status_code == 200, posted.text
    assert_cors(posted, origin)


async def test_requests_without_origin_are_served_as_before(client: httpx.AsyncClient) -> None:
    response = await client.get("/histories")  # the desktop app's own process, curl, scripts
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("origin", FOREIGN)
async def test_a_foreign_page_can_neither_read_nor_change_anything(
    loaded_client: httpx.AsyncClient,
    settings: Settings,
    tiny_pipeline: StableDiffusionPipeline,
    tmp_path: Path,
    origin: str,
) -> None:
    client = loaded_client
    lora_id = await upload_lora(client, write_lora(tmp_path / "style.safetensors", tiny_pipeline))
    history_id = await create_history(client, BASE_CONFIG)
    before = await _everything(client, settings)
    hostile = {"Origin": origin}
    text_plain = {**hostile, "Content-Type": "text/plain"}  # needs no preflight in a browser
    secret_path = json.dumps({"file_path": str(tmp_path / "style.safetensors")})
    attempts = [
        client.get("/histories", headers=hostile),
        client.get("/loras", headers=hostile),
        client.get("/", headers=hostile),
        client.post("/histories", content=json.dumps(BASE_CONFIG), headers=text_plain),
        client.post("/loras/upload", content=secret_path, headers=text_plain),
        client.post(
            "/loras/download", content='{"url": "http://192.168.1.1/"}', headers=text_plain
        ),
        client.delete(f"/histories/{history_id}", headers=hostile),
        client.delete(f"/loras/{lora_id}", headers=hostile),
        client.delete("/models", params={"model_id": "embedded/tiny-sd"}, headers=hostile),
        client.put("/config/safety-check", json={"enabled": False}, headers=hostile),
        client.options("/histories", headers={**hostile, **PREFLIGHT}),
        client.get("/generated_images/anything.png", headers=hostile),
    ]
    for attempt in attempts:
        assert_refused_origin(await attempt, origin)
    assert await _everything(client, settings) == before


async def _everything(client: httpx.AsyncClient, settings: Settings) -> tuple[Any, ...]:
    """What a hostile request could change: the records the API lists and the cache files."""
    files = sorted(
        (str(path.relative_to(settings.cache_dir)), path.stat().st_size)
        for path in settings.cache_dir.rglob("*")
        if path.is_file() and path.suffix not in (".db-wal", ".db-shm")
    )
    listed = [
        (await client.get(path)).json()
        for path in ("/histories", "/loras", "/loras/downloads", "/config")
    ]
    models = (await client.get("/models/downloaded")).json()
    return files, listed, models


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "192.168.1.5", "[::2]"])
async def test_a_rebinding_name_is_refused(client: httpx.AsyncClient, host: str) -> None:
    response = await client.get("/histories", headers={"Host": host})
    assert response.status_code == 403
    assert response.json() == {
        "detail": f"Host {host} is not allowed; add it to LOCALAI_ALLOWED_HOSTS"
    }
    # Same-origin for the page (its origin is the rebinding name): refused all the same.
    same_origin = await client.post(
        "/histories", json=BASE_CONFIG, headers={"Host": host, "Origin": f"http://{host}"}
    )
    assert same_origin.status_code == 403
    assert (await client.get("/histories")).json() == []


@pytest.mark.parametrize("host", ["localhost:8123", "127.0.0.1:8123", "[::1]:8123", "LOCALHOST"])
async def test_this_machine_is_served_under_its_loopback_names(
    client: httpx.AsyncClient, host: str
) -> None:
    assert (await client.get("/histories", headers={"Host": host})).status_code == 200


async def test_the_settings_widen_both_lists(settings: Settings) -> None:
    widened = settings.model_copy(
        update={
            "allowed_origins": ("https://studio.example", "http://tablet.lan:8080"),
            "allowed_hosts": ("workstation.lan",),
        }
    )
    async with running_app(widened) as (_app, client):
        for origin in ("https://studio.example", "http://tablet.lan:8080", "app://-"):
            response = await client.get("/histories", headers={"Origin": origin})
            assert response.status_code == 200
            assert_cors(response, origin)
        assert_refused_origin(
            await client.get("/histories", headers={"Origin": "https://evil.example"}),
            "https://evil.example",
        )
        host = {"Host": "workstation.lan:8000"}
        assert (await client.get("/histories", headers=host)).status_code == 200
        assert (await client.get("/histories", headers={"Host": "evil.lan"})).status_code == 403


async def test_a_star_restores_allow_all(settings: Settings) -> None:
    open_to_all = settings.model_copy(update={"allowed_origins": ("*",), "allowed_hosts": ("*",)})
    async with running_app(open_to_all) as (_app, client):
        for origin in FOREIGN:
            response = await client.get("/histories", headers={"Origin": origin})
            assert response.status_code == 200
            assert_cors(response, origin)
        assert (await client.get("/histories", headers={"Host": "evil.example"})).status_code == 200


async def test_a_server_bound_to_a_lan_address_answers_to_it(settings: Settings) -> None:
    lan = settings.model_copy(update={"host": "192.168.1.5"})
    async with running_app(lan) as (_app, client):
        assert (await client.get("/", headers={"Host": "192.168.1.5:8000"})).status_code == 200
        assert (await client.get("/", headers={"Host": "192.168.1.6"})).status_code == 403


def test_the_websocket_handshake_obeys_the_same_lists(server_url: str) -> None:
    """A real Socket.IO client against a real uvicorn: a foreign page cannot open the
    websocket (progress, prompts in previews, download events); the UI's origins can."""
    for origin in ("http://localhost:3000", "app://-"):
        ui = socket_client(origin=origin)
        connect(ui, server_url)
        assert ui.connected
        ui.disconnect()
    port = server_url.rsplit(":", 1)[1]
    refused = [
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"origin": f"http://evil.example:{port}", "host": f"evil.example:{port}"},
    ]
    for headers in refused:
        page = socket_client(**headers)
        with pytest.raises(socketio.exceptions.ConnectionError):
            connect(page, server_url)
        assert not page.connected
    with httpx.Client(base_url=server_url, timeout=WAIT_TIMEOUT) as http:  # plain HTTP too
        response = http.get(
            "/socket.io/",
            params={"EIO": "4", "transport": "websocket"},
            headers={"Origin": "https://evil.example"},
        )
        assert_refused_origin(response, "https://evil.example")


async def test_a_second_origin_or_host_header_cannot_smuggle_a_name_in(
    client: httpx.AsyncClient,
) -> None:
    two_origins = [("Origin", "http://localhost:3000"), ("Origin", "https://evil.example")]
    assert_refused_origin(
        await client.get("/histories", headers=two_origins), "https://evil.example"
    )
    two_hosts = [("Host", "localhost"), ("Host", "evil.example")]
    assert (await client.get("/histories", headers=two_hosts)).status_code == 403
