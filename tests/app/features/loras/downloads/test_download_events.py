"""Download events as the UI receives them: a real uvicorn server, a real Socket.IO client on
the websocket transport, the file coming slowly from the fake remote."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import socketio

from app.config import Settings
from tests.fake_remote import FakeRemote
from tests.harness import WAIT_TIMEOUT, live_server, wait_until_sync

TIMEOUT = WAIT_TIMEOUT  # a bound for a broken run, not a speed target
Event = tuple[str, dict[str, Any]]


@pytest.fixture
def server_url(settings: Settings) -> Iterator[str]:
    with live_server(settings) as url:
        yield url


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
            wait_until_sync(lambda: any(name == "lora_download_completed" for name, _ in received))
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
