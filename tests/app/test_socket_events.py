"""Socket.IO events as the UI receives them: a real uvicorn server on a loopback port, a real
Socket.IO client on the websocket transport only, and real HTTP requests driving the work."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from app.config import EMBEDDED_MODEL_ID, Settings
from app.main import SOCKET_MAX_MESSAGE_BYTES
from tests.api import config_with
from tests.harness import (
    WAIT_TIMEOUT,
    Event,
    connect,
    live_server,
    socket_client,
    socket_events,
    wait_for_event,
    wait_until_sync,
)

LOAD_PHASES = [
    "initialization",
    "initialization",
    "loading_model",
    "loading_model",
    "loading_model",
    "device_setup",
    "device_setup",
    "optimization",
]


@pytest.fixture
def http(server_url: str) -> Iterator[httpx.Client]:
    """Plain HTTP to the real server, driving the work."""
    with httpx.Client(base_url=server_url, timeout=WAIT_TIMEOUT) as client:
        yield client


@pytest.fixture
def events(server_url: str) -> Iterator[list[Event]]:
    """Every event the server broadcasts while the test runs, in arrival order."""
    with socket_events(server_url) as received:
        yield received


def _names(events: list[Event]) -> list[str]:
    return [name for name, _ in events]


def _load(http: httpx.Client) -> None:
    response = http.post("/models/load", json={"model_id": EMBEDDED_MODEL_ID})
    assert response.status_code == 200, response.text


def _loaded(http: httpx.Client, events: list[Event]) -> int:
    """Load the model and wait for its last load event; where the next events start."""
    _load(http)
    wait_for_event(events, "model_load_completed")
    return len(events)


def _generate(http: httpx.Client, **overrides: Any) -> dict[str, Any]:
    """``tests.api.post_generate`` for this synchronous client: the UI's two requests."""
    config = config_with(**overrides)
    history = http.post("/histories", json=config)
    assert history.status_code == 200, history.text
    response = http.post("/generators", json={"history_id": history.json(), "config": config})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_model_load_events(http: httpx.Client, events: list[Event]) -> None:
    _load(http)

    load = wait_for_event(events, "model_load_completed")
    assert _names(load) == [
        "model_load_started",
        *["model_load_progress"] * 8,
        "model_load_completed",
    ]
    assert load[0][1] == {"model_id": EMBEDDED_MODEL_ID}
    assert load[-1][1] == {"model_id": EMBEDDED_MODEL_ID}
    progress = [data for _, data in load[1:-1]]
    assert [p["step"] for p in progress] == list(range(1, 9))
    assert {p["total"] for p in progress} == {8}
    assert [p["phase"] for p in progress] == LOAD_PHASES
    assert all(p["model_id"] == EMBEDDED_MODEL_ID for p in progress)
    assert all(isinstance(p["message"], str) and p["message"] for p in progress)

    # Loading the loaded model again answers at once and emits nothing. The emitter keeps
    # one FIFO, so a generation afterwards is a barrier: any load event would come first.
    again = len(events)
    _load(http)
    _generate(http, prompt="barrier", steps=1)
    after = wait_for_event(events, "generation_phase", again, current="completed")
    assert _names(after)[0] == "generation_phase"
    assert not [name for name in _names(after) if name.startswith("model_load")]


def _decode_preview(data: dict[str, Any]) -> Image.Image:
    encoded = data["image_base64"]
    assert isinstance(encoded, str)
    assert not encoded.startswith("data:")
    raw = base64.b64decode(encoded, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def test_generation_events(http: httpx.Client, events: list[Event]) -> None:
    start = _loaded(http, events)
    body = _generate(http, steps=3, number_of_images=2)
    assert len(body["items"]) == 2

    run = wait_for_event(events, "generation_phase", start, current="completed")
    assert run[0] == (
        "generation_phase",
        {"phases": ["image_generation"], "current": "image_generation"},
    )
    assert run[-1] == ("generation_phase", {"phases": ["image_generation"], "current": "completed"})
    steps = run[1:-1]
    assert _names(steps) == ["image_generation_step_end"] * 6
    # One event per image per step, image by image within each step.
    assert [(d["current_step"], d["index"]) for _, d in steps] == [
        (step, index) for step in range(3) for index in range(2)
    ]
    for _, data in steps:
        assert isinstance(data["timestep"], float)
        assert _decode_preview(data).size == (8, 8)  # latent resolution: 1/8 of 64x64
    timesteps = [d["timestep"] for _, d in steps[::2]]
    assert timesteps == sorted(timesteps, reverse=True)  # denoising runs down the schedule


def test_generation_events_with_hires_fix(http: httpx.Client, events: list[Event]) -> None:
    start = _loaded(http, events)
    hires = {"upscale_factor": 1.5, "upscaler": "Bicubic", "denoising_strength": 0.5, "steps": 2}
    _generate(http, steps=2, hires_fix=hires)

    run = wait_for_event(events, "generation_phase", start, current="completed")
    phases = ["image_generation", "upscaling"]
    assert _names(run) == [
        "generation_phase",
        "image_generation_step_end",
        "image_generation_step_end",
        "generation_phase",
        "generation_phase",
    ]
    assert [data["current"] for name, data in run if name == "generation_phase"] == [
        "image_generation",
        "upscaling",
        "completed",
    ]
    assert all(data["phases"] == phases for name, data in run if name == "generation_phase")


def test_long_polling_is_not_served(http: httpx.Client) -> None:
    # The UI uses the websocket transport only; a polling handshake or an oversized polling
    # POST is answered at once, and its connection is released (a new request gets through).
    handshake = http.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
    assert handshake.status_code == 400
    big = http.post(
        "/socket.io/",
        params={"EIO": "4", "transport": "polling", "sid": "x"},
        content=b"4" + b"x" * 2_000_000,
    )
    assert big.status_code == 400
    assert http.get("/").status_code == 200


def test_an_oversized_websocket_message_closes_only_that_connection(
    server_url: str, http: httpx.Client
) -> None:
    client = socket_client()
    connect(client, server_url)
    try:
        client.emit("anything", "x" * (SOCKET_MAX_MESSAGE_BYTES + 1))
        wait_until_sync(lambda: not client.connected, what="the oversized client dropped")
    finally:
        client.disconnect()
    assert http.get("/").status_code == 200


def test_shutdown_completes_with_clients_connected(settings: Settings) -> None:
    clients = [socket_client() for _ in range(3)]
    with live_server(settings) as url:  # on leaving: stopped, or the test fails
        for client in clients:
            connect(client, url)
        assert all(client.connected for client in clients)
    for client in clients:
        client.disconnect()
