"""Download events as the UI receives them: a real uvicorn server, a real Socket.IO client on
the websocket transport, the file coming slowly from the fake remote."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import socketio
import uvicorn

from app.config import Settings
from app.main import create_asgi_app
from tests.app.features.loras.downloads.fake_remote import FakeRemote

TIMEOUT = 20.0
Event = tuple[str, dict[str, Any]]


def _wait(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def server_url(settings: Settings) -> Iterator[str]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_asgi_app(settings), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started or not thread.is_alive(), timeout=60)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def test_progress_events_in_order(
    server_url: str, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    data = lora_bytes["kohya_unet"]
    url = remote.serve("/slow.safetensors", data, chunk=len(data) // 5 + 1, delay=0.3)
    received: list[Event] = []
    client = socketio.Client(reconnection=False)
    client.on("*", lambda event, payload: received.append((event, payload)))
    client.connect(server_url, transports=["websocket"], wait_timeout=TIMEOUT)
    try:
        with httpx.Client(base_url=server_url, timeout=TIMEOUT) as http:
            response = http.post("/loras/download", json={"url": url})
            assert response.status_code == 202, response.text
            download_id = response.json()["id"]
            _wait(lambda: any(name == "lora_download_completed" for name, _ in received))
            lora = http.get(f"/loras/{received[-1][1]['lora']['id']}").json()
    finally:
        client.disconnect()

    ours = [(name, payload) for name, payload in received if payload["download_id"] == download_id]
    names = [name for name, _ in ours]
    assert names[0] == "lora_download_started"
    assert names[-1] == "lora_download_completed"
    assert set(names[1:-1]) == {"lora_download_progress"}
    assert len(names) - 2 >= 3  # several throttled updates over ~1.5 s, and the final one
    assert ours[0][1] == {
        "download_id": download_id,
        "source": "url",
        "file_name": "slow.safetensors",
    }
    done = [payload["bytes_done"] for _, payload in ours[1:-1]]
    assert done == sorted(set(done))  # strictly increasing
    assert done[-1] == len(data)
    assert ours[-2][1]["bytes_total"] == len(data)
    assert ours[-1][1] == {"download_id": download_id, "lora": lora}
