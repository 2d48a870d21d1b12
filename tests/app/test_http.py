"""HTTP conventions every route shares: unexpected errors are JSON 500s a browser can read."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.config import EMBEDDED_MODEL_ID, Settings
from tests.harness import WAIT_TIMEOUT, running_app, sqlite_refuses

ORIGIN = "http://localhost:3000"


async def test_a_server_error_carries_cors_headers(settings: Settings) -> None:
    # Without CORS headers the browser reports a CORS failure instead of the 500.
    async with running_app(settings, raise_app_exceptions=False) as (_, client):
        sqlite_refuses(settings, "DELETE", "models")
        response = await client.delete(
            "/models", params={"model_id": EMBEDDED_MODEL_ID}, headers={"Origin": ORIGIN}
        )
        assert response.status_code == 500
        assert response.json() == {"detail": "Internal server error"}
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert response.headers["access-control-allow-credentials"] == "true"
        # The server goes on answering on the same client.
        assert (await client.get("/", headers={"Origin": ORIGIN})).status_code == 200


TOO_BIG_ID = 2**63  # one more than SQLite's largest integer

ODD_INPUT = [
    ("post", "/loras/upload", {"json": {"file_path": "/tmp/a\x00b.safetensors"}}, 400, "invalid"),
    (
        "post",
        "/loras/upload",
        {"json": {"file_path": "~no-such-user-x/a.safetensors"}},
        400,
        "home",
    ),
    (
        "post",
        "/loras/download",
        {"json": {"url": "http://127.0.0.1:9/a\x00.safetensors"}},
        400,
        "URL",
    ),
    (
        "post",
        "/loras/download",
        {"json": {"url": "http://127.0.0.1:9/a b.safetensors"}},
        400,
        "space",
    ),
    ("post", "/models/load", {"json": {"model_id": "a\x00b"}}, 422, "control"),
    ("delete", "/models", {"params": {"model_id": "a\x00b"}}, 422, "control"),
    ("get", f"/loras/{TOO_BIG_ID}", {}, 422, "less than or equal"),
    ("delete", f"/loras/{TOO_BIG_ID}", {}, 422, "less than or equal"),
    ("delete", f"/histories/{TOO_BIG_ID}", {}, 422, "less than or equal"),
    (
        "post",
        "/generators",
        {"json": {"history_id": TOO_BIG_ID, "config": {"prompt": "x"}}},
        422,
        "less",
    ),
    (
        "post",
        "/histories",
        {"json": {"prompt": "x", "loras": [{"lora_id": TOO_BIG_ID, "weight": 1}]}},
        422,
        "less than or equal",
    ),
    # Booleans are not numbers (pydantic's lax mode would read true as a weight of 1).
    (
        "post",
        "/histories",
        {"json": {"prompt": "x", "loras": [{"lora_id": 1, "weight": True}]}},
        422,
        "not true or false",
    ),
    ("post", "/histories", {"json": {"prompt": "x", "steps": False}}, 422, "not true or false"),
]


@pytest.mark.parametrize(
    ("method", "path", "options", "status", "fragment"),
    ODD_INPUT,
    ids=[f"{case[0]} {case[1]} {index}" for index, case in enumerate(ODD_INPUT)],
)
async def test_odd_input_is_refused_with_a_reason(
    settings: Settings, method: str, path: str, options: dict[str, Any], status: int, fragment: str
) -> None:
    # NUL bytes, unknown ~users and ids beyond 64 bits used to reach the file system or
    # SQLite and come back as 500s.
    async with running_app(settings, raise_app_exceptions=False) as (_, client):
        response = await client.request(method.upper(), path, **options)
    assert response.status_code == status, response.text
    assert fragment.lower() in response.text.lower()


JSON = {"content-type": "application/json"}
NOT_STRICT_JSON = [
    (b'{"prompt": "x", "cfg_scale": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "x", "width": Infinity}', "Infinity is not a JSON number"),
    (b'{"prompt": "x", "seed": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"prompt": "\\ud800"}', "lone surrogate"),
    (b'{"prompt": "x", "styles": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"prompt": "\xff"}', "not UTF-8"),
]


@pytest.mark.parametrize(("body", "reason"), NOT_STRICT_JSON, ids=lambda v: str(v)[:20])
async def test_bodies_that_are_not_strict_json_get_a_422_that_serialises(
    loaded_client: httpx.AsyncClient, body: bytes, reason: str
) -> None:
    # Python's parser accepts NaN/Infinity and lone surrogates; the 422 naming them could
    # not be serialised, and SQLite cannot store a lone surrogate: each was a 500.
    response = await loaded_client.post("/histories", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["type"] == "json_invalid"
    assert reason in error["ctx"]["error"]
    assert (await loaded_client.get("/histories")).json() == []


@pytest.mark.parametrize(
    "body",
    [
        {"url": "http://127.0.0.1:9/a.safetensors", "token": "t\u00e9st"},
        {"url": "http://127.0.0.1:9/a.safetensors?token=t%C3%A9st"},
        {"civitai": {"model_version_id": 5}, "token": "with space"},
    ],
    ids=["non-ascii", "non-ascii-in-url", "space"],
)
async def test_a_token_that_cannot_be_sent_is_refused_at_once(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await client.post("/loras/download", json=body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "token is invalid" in detail
    assert "t\u00e9st" not in detail  # never echoed
    assert "with space" not in detail
    assert (await client.get("/loras/downloads")).json() == {"downloads": []}


def test_a_server_error_leaves_the_keep_alive_connection_usable(
    settings: Settings, server_url: str
) -> None:
    # Over a real server: after a 500 the next request on the same connection is answered
    # (the error used to be re-raised to uvicorn, which dropped the connection unannounced).
    sqlite_refuses(settings, "DELETE", "models")
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=server_url, limits=limits, timeout=WAIT_TIMEOUT) as client:
        failed = client.delete("/models", params={"model_id": EMBEDDED_MODEL_ID})
        assert failed.status_code == 500
        assert failed.headers.get("connection") != "close"
        assert client.get("/").status_code == 200
