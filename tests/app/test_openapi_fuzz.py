"""Every operation in the OpenAPI schema, driven with generated requests (schemathesis on top of
Hypothesis) against a real uvicorn serving the real app: migrated SQLite file, embedded model,
real LoRA files. No request may get a server error (5xx), and every response the schema
documents must match its schema.

Two phases run per operation: schemathesis' coverage phase (schema boundaries, each enum value,
missing and wrongly typed fields, unexpected methods) and ``FUZZ_EXAMPLES`` random examples
(20 by default; ``make fuzz`` runs 200). The seed is fixed (``FUZZ_SEED`` picks another) and
Hypothesis generates deterministically: a failure found once is found again.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import pytest
import requests
import schemathesis
import torch
from diffusers import StableDiffusionPipeline
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.config import EMBEDDED_MODEL_ID, Settings
from app.main import create_app
from tests.factories import lora_files
from tests.fake_remote import running_remote
from tests.harness import WAIT_TIMEOUT, live_server, settings_with_embedded_model

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
"""Random examples per operation (Hypothesis' ``max_examples``)."""

GENERATION_EXAMPLES = max(5, FUZZ_EXAMPLES // 4)
"""POST /generators runs real diffusion for every request it accepts: fewer of those."""

SEED = int(os.environ.get("FUZZ_SEED", "20261125"))
"""Fixed, so that every run sends the same requests; ``FUZZ_SEED`` explores others."""

CLOSED_PORT_URL = "http://127.0.0.1:9"
"""Nothing listens on the discard port: a download from there fails at once."""

# The most work one accepted generation may ask for here. The schema allows 2048 px, 16 images,
# 150 steps and a 4x hires pass (minutes of CPU per request), and the coverage phase sends each
# boundary; what this run is after is every combination of parameters reaching the pipeline,
# not big images. 72 px keeps sides that are not multiples of 8 (rounded down by the app).
MAX_SIDE = 72
MAX_IMAGES = 2
MAX_STEPS = 2
MAX_HIRES_FACTOR = 1.5


def published_schema() -> dict[str, Any]:
    """The OpenAPI document the app serves at /openapi.json. It is built from the routes alone,
    so it is known when tests are collected (one test per operation) without a server."""
    with tempfile.TemporaryDirectory() as cache:
        document: dict[str, Any] = create_app(Settings(cache_dir=Path(cache))).openapi()
    return document


PUBLISHED_SCHEMA = published_schema()

api = schemathesis.openapi.from_dict(
    PUBLISHED_SCHEMA,
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {
                "max-examples": FUZZ_EXAMPLES,
                "deterministic": True,
                # Nothing written to .hypothesis/: the run is the same every time anyway.
                "database": "none",
            },
            "checks": {
                # Timestamps are naive ISO-8601 by contract (CONTRACT.md: no offset, as SQLite
                # stores them); JSON Schema's "date-time" (RFC 3339) requires an offset.
                "response_schema_conformance": {"validate-formats": False},
            },
            "operations": [
                {
                    "include-path": "/generators",
                    "include-method": "POST",
                    "generation": {"max-examples": GENERATION_EXAMPLES},
                }
            ],
        }
    ),
)


@dataclass(frozen=True)
class ServerUnderTest:
    base_url: str
    http: requests.Session
    lora_ids: list[int]
    """LoRAs uploaded before the run: generation requests name these."""


@dataclass
class Tally:
    """Requests sent and server errors answered, per operation, for the run's summary line."""

    requests: Counter[str] = field(default_factory=Counter)
    server_errors: Counter[str] = field(default_factory=Counter)

    def record(self, operation: str, status_code: int) -> None:
        self.requests[operation] += 1
        if status_code >= 500:
            self.server_errors[operation] += 1

    def summary(self) -> str:
        return (
            f"OpenAPI fuzz run: {len(self.requests)} operations, "
            f"{self.requests.total()} requests, {self.server_errors.total()} server errors "
            f"(FUZZ_EXAMPLES={FUZZ_EXAMPLES}, seed {SEED})"
        )


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path
) -> Iterator[ServerUnderTest]:
    """The app served by uvicorn on its own cache, with two LoRAs uploaded."""
    root = tmp_path_factory.mktemp("fuzz")
    settings = settings_with_embedded_model(
        root / "cache",
        embedded_model_dir,
        # The UI's device choice (PUT /config/device, fuzzed too) must not send loads to a GPU
        # that is not there: the generations need the model.
        device="cpu",
        huggingface_base_url=CLOSED_PORT_URL,  # replaced by the fake Hub below
        civitai_base_url=CLOSED_PORT_URL,
        lora_download_attempts=1,
        lora_download_retry_delay=0,
    )
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(embedded_model_dir), torch_dtype=torch.float32, local_files_only=True
    )
    lora_paths = [
        lora_files.write_lora(root / "unet.safetensors", pipeline, fmt="kohya"),
        lora_files.write_lora(
            root / "unet_te.safetensors",
            pipeline,
            fmt="peft",
            components=("unet", "text_encoder"),
            seed=1,
        ),
    ]
    with pytest.MonkeyPatch.context() as env:
        # A generated download URL naming some other host goes to a proxy that is not there
        # (the app's HTTP client honours these variables): nothing leaves the machine.
        for name in ("ALL_PROXY", "HTTP_PROXY", "HTTPS_PROXY"):
            env.setenv(name, CLOSED_PORT_URL)
            env.setenv(name.lower(), CLOSED_PORT_URL)
        env.setenv("NO_PROXY", "127.0.0.1")
        env.setenv("no_proxy", "127.0.0.1")
        # The Hub answers (a fake one on loopback: no repository exists there, the search
        # finds nothing): a closed port would make every hub route a 502, which is right for
        # a machine without network but hides what the routes do with their input.
        with (
            running_remote() as remote,
            live_server(
                settings.model_copy(update={"huggingface_base_url": remote.url("/hub")})
            ) as base_url,
            requests.Session() as http,
        ):
            lora_ids = []
            for path in lora_paths:
                response = http.post(
                    f"{base_url}/loras/upload", json={"file_path": str(path)}, timeout=WAIT_TIMEOUT
                )
                assert response.status_code == 201, response.text
                lora_ids.append(response.json()["id"])
            yield ServerUnderTest(base_url, http, lora_ids)


@pytest.fixture(scope="module")
def tally(pytestconfig: pytest.Config) -> Iterator[Tally]:
    counts = Tally()
    yield counts
    # Shown with the test results (CI logs), not in the captured output of a passing test.
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(counts.summary())


def test_the_server_publishes_the_schema_under_test(server: ServerUnderTest) -> None:
    response = server.http.get(f"{server.base_url}/openapi.json", timeout=WAIT_TIMEOUT)
    assert response.status_code == 200
    assert response.json() == PUBLISHED_SCHEMA


@api.parametrize()
def test_no_request_gets_a_server_error(
    case: schemathesis.Case[Any], server: ServerUnderTest, tally: Tally
) -> None:
    if case.operation.label == "POST /generators":
        prepare_generation(case, server)
    response = case.call(base_url=server.base_url, session=server.http, timeout=WAIT_TIMEOUT)
    tally.record(case.operation.label, response.status_code)
    assert response.status_code < 500, f"{case.operation.label}: {response.text}"
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])


def prepare_generation(case: schemathesis.Case[Any], server: ServerUnderTest) -> None:
    """Make a generation request one the pipeline runs, sent as the UI sends it: the work
    bounded, its LoRAs ones the server has, the model loaded and a history entry made first."""
    body = case.body
    config = body.get("config") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(config, dict):
        return  # refused before any work
    # The defaults (512 px, 24 steps) are work too: a request leaving them out gets small ones.
    for key, most in (("width", MAX_SIDE), ("height", MAX_SIDE), ("steps", MAX_STEPS)):
        config.setdefault(key, most)
    for key, most in (
        ("width", MAX_SIDE),
        ("height", MAX_SIDE),
        ("number_of_images", MAX_IMAGES),
        ("steps", MAX_STEPS),
    ):
        bound(config, key, most)
    hires = config.get("hires_fix")
    if isinstance(hires, dict):
        bound(hires, "upscale_factor", MAX_HIRES_FACTOR)
        bound(hires, "steps", MAX_STEPS)
    loras = config.get("loras")
    if isinstance(loras, list):
        for index, item in enumerate(loras):
            if isinstance(item, dict) and is_number(item.get("lora_id")):
                item["lora_id"] = server.lora_ids[index % len(server.lora_ids)]
    # POST /models/unload and DELETE /models are fuzzed too: load again (at once when loaded).
    loaded = server.http.post(
        f"{server.base_url}/models/load", json={"model_id": EMBEDDED_MODEL_ID}, timeout=WAIT_TIMEOUT
    )
    assert loaded.status_code == 200, loaded.text
    history = server.http.post(f"{server.base_url}/histories", json=config, timeout=WAIT_TIMEOUT)
    if history.status_code == 200:
        body["history_id"] = history.json()


def bound(values: dict[str, Any], key: str, most: float) -> None:
    """``values[key]`` at most ``most``; values of the wrong type are left for the server to
    refuse."""
    value = values.get(key)
    if is_number(value) and value > most:
        values[key] = most


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
