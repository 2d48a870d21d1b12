"""Download events as the UI receives them: a real uvicorn server, a real Socket.IO client on
the websocket transport, the file coming slowly from the fake remote."""

from __future__ import annotations

import httpx

from tests.fake_remote import FakeRemote
from tests.harness import WAIT_TIMEOUT, socket_events, wait_for_event


def test_progress_events_in_order(
    server_url: str, remote: FakeRemote, lora_bytes: dict[str, bytes]
) -> None:
    data = lora_bytes["kohya_unet"]
    url = remote.serve("/slow.safetensors", data, chunk=len(data) // 5 + 1, delay=0.3)
    with (
        socket_events(server_url) as received,
        httpx.Client(base_url=server_url, timeout=WAIT_TIMEOUT) as http,
    ):
        response = http.post("/loras/download", json={"url": url})
        assert response.status_code == 202, response.text
        download_id = response.json()["id"]
        wait_for_event(received, "lora_download_completed")
        lora = http.get(f"/loras/{received[-1][1]['lora']['id']}").json()

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
