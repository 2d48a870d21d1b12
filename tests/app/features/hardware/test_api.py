"""GET /hardware/ reports what this machine really has."""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
OVERALL = {"ready", "no_gpu", "driver_issue", "incompatible_cuda", "unknown_error"}


async def test_report_has_every_field_the_ui_reads(client: httpx.AsyncClient) -> None:
    response = await client.get("/hardware/")
    assert response.status_code == 200
    status = response.json()
    assert isinstance(status["is_cuda"], bool)
    assert isinstance(status["cuda_runtime_version"], str)
    assert isinstance(status["nvidia_driver_version"], str)
    assert isinstance(status["message"], str)
    assert status["message"]
    assert status["overall_status"] in OVERALL
    assert isinstance(status["macos_mps_available"], bool)
    assert isinstance(status["troubleshooting_steps"], list)
    assert (await client.get("/hardware")).json() == status  # same answer without the slash


@pytest.mark.skipif(
    HAS_CUDA or shutil.which("nvidia-smi") is not None,
    reason="expects a machine without CUDA and without an NVIDIA driver",
)
async def test_no_gpu_machine(client: httpx.AsyncClient) -> None:
    status = (await client.get("/hardware/")).json()
    assert status["is_cuda"] is False
    assert status["overall_status"] == "no_gpu"
    assert status["gpus"] == []
    assert status["nvidia_driver_version"] == "0"
    if torch.version.cuda is None:  # a CPU build of torch has no CUDA runtime to report
        assert status["cuda_runtime_version"] == "0"
    assert status["recommendation_link"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
async def test_cuda_machine_lists_its_gpus(client: httpx.AsyncClient) -> None:
    status = (await client.get("/hardware/")).json()
    assert status["is_cuda"] is True
    assert status["overall_status"] == "ready"
    assert len(status["gpus"]) == torch.cuda.device_count()
    assert status["gpus"][0]["is_primary"] is True
    assert all(gpu["memory"] > 0 for gpu in status["gpus"])
    assert status["cuda_runtime_version"] != "0"
