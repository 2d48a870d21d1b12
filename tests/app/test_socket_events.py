"""Socket.IO events as the UI receives them: a real uvicorn server on a loopback port, a real
Socket.IO client on the websocket transport only, and real HTTP requests driving the work."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
from PIL import Image

from app.config import EMBEDDED_MODEL_ID, Settings
from app.main import SOCKET_MAX_MESSAGE_BYTES
from tests.harness import WAIT_TIMEOUT, live_server, wait_until_sync

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
TIMEOUT = WAIT_TIMEOUT  # a bound for a broken run, not a speed target

Event = tuple[str, dict[str, Any]]


@dataclass
class Server:
    url: str
    http: httpx.Client


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Iterator[Server]:
    """The real server, shared by this module's tests."""
    cache = tmp_path_factory.mktemp("socket") / "cache"
    shutil.copytree(embedded_model_dir, cache / "models" / "embedded--tiny-sd")
    with (
        live_server(Settings(cache_dir=cache)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        yield Server(url=url, http=http)


@pytest.fixture
def events(server: Server) -> Iterator[list[Event]]:
    """Every event the server broadcasts while the test runs, in arrival order."""
    received: list[Event] = []
    client = socketio.Client(reconnection=False)

    def _record(event: str, data: dict[str, Any]) -> None:
        received.append((event, data))

    client.on("*", _record)  # the catch-all handler gets every event's name and payload
    client.connect(server.url, transports=["websocket"], wait_timeout=TIMEOUT)
    assert client.transport() == "websocket"
    try:
        yield received
    finally:
        client.disconnect()


def _wait_for_event(received: list[Event], start: int, name: str, **fields: Any) -> list[Event]:
    """Wait until ``name`` with ``fields`` arrives after ``received[start]``; events so far."""

    def arrived() -> bool:
        return any(
            event == name and all(data.get(k) == v for k, v in fields.items())
            for event, data in received[start:]
        )

    wait_until_sync(arrived, what=f"event {name}")
    return list(received[start:])


def _names(events: list[Event]) -> list[str]:
    return [name for name, _ in events]


def _generate(server: Server, config: dict[str, Any]) -> dict[str, Any]:
    history = server.http.post("/histories", json=config)
    assert history.status_code == 200, history.text
    response = server.http.post(
        "/generators", json={"history_id": history.json(), "config": config}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_model_load_events(server: Server, events: list[Event]) -> None:
    assert server.http.post("/models/unload").status_code == 200
    start = len(events)
    response = server.http.post("/models/load", json={"model_id": EMBEDDED_MODEL_ID})
    assert response.status_code == 200, response.text

    load = _wait_for_event(events, start, "model_load_completed")
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
    response = server.http.post("/models/load", json={"model_id": EMBEDDED_MODEL_ID})
    assert response.status_code == 200
    _generate(server, {"prompt": "barrier", "width": 64, "height": 64, "steps": 1})
    after = _wait_for_event(events, again, "generation_phase", current="completed")
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


def test_generation_events(server: Server, events: list[Event]) -> None:
    loaded = server.http.post("/models/load", json={"model_id": EMBEDDED_MODEL_ID})
    assert loaded.status_code == 200
    start = len(events)
    config = {"prompt": "a boat", "width": 64, "height": 64, "steps": 3, "number_of_images": 2}
    body = _generate(server, config)
    assert len(body["items"]) == 2

    run = _wait_for_event(events, start, "generation_phase", current="completed")
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


def test_generation_events_with_hires_fix(server: Server, events: list[Event]) -> None:
    loaded = server.http.post("/models/load", json={"model_id": EMBEDDED_MODEL_ID})
    assert loaded.status_code == 200
    start = len(events)
    hires = {"upscale_factor": 1.5, "upscaler": "Bicubic", "denoising_strength": 0.5, "steps": 2}
    config = {"prompt": "a boat", "width": 64, "height": 64, "steps": 2, "hires_fix": hires}
    _generate(server, config)

    run = _wait_for_event(events, start, "generation_phase", current="completed")
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


def test_long_polling_is_not_served(server: Server) -> None:
    # The UI uses the websocket transport only; a polling handshake or an oversized polling
    # POST is answered at once, and its connection is released (a new request gets through).
    handshake = server.http.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
    assert handshake.status_code == 400
    big = server.http.post(
        "/socket.io/",
        params={"EIO": "4", "transport": "polling", "sid": "x"},
        content=b"4" + b"x" * 2_000_000,
    )
    assert big.status_code == 400
    assert server.http.get("/").status_code == 200


def test_an_oversized_websocket_message_closes_only_that_connection(server: Server) -> None:
    client = socketio.Client(reconnection=False)
    client.connect(server.url, transports=["websocket"], wait_timeout=TIMEOUT)
    try:
        client.emit("anything", "x" * (SOCKET_MAX_MESSAGE_BYTES + 1))
        wait_until_sync(lambda: not client.connected, what="the oversized client dropped")
    finally:
        client.disconnect()
    assert server.http.get("/").status_code == 200


def test_shutdown_completes_with_clients_connected(settings: Settings) -> None:
    clients = [socketio.Client(reconnection=False) for _ in range(3)]
    with live_server(settings) as url:  # on leaving: stopped, or the test fails
        for client in clients:
            client.connect(url, transports=["websocket"], wait_timeout=TIMEOUT)
        assert all(client.connected for client in clients)
    for client in clients:
        client.disconnect()
