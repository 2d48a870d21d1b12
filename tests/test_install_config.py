"""How torch gets installed: the Makefile's pip commands and uv's configuration in pyproject.toml.

A machine without a GPU must never be handed the multi-GB CUDA build, whether set up with `make`
or with the desktop UI's `uv sync`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CU128_INDEX = "https://download.pytorch.org/whl/cu128"


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def make_version() -> str:
    match = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match
    return match.group(1)


def test_every_torch_source_is_an_explicit_pytorch_index(pyproject: dict[str, Any]) -> None:
    uv = pyproject["tool"]["uv"]
    indexes = {index["name"]: index for index in uv["index"]}
    by_group = {source["group"]: source["index"] for source in uv["sources"]["torch"]}
    assert {group: indexes[name]["url"] for group, name in by_group.items()} == {
        "cpu": CPU_INDEX,
        "cu128": CU128_INDEX,
    }
    # explicit: those indexes serve torch only; everything else still comes from PyPI.
    assert all(indexes[name].get("explicit") is True for name in by_group.values())


def test_plain_uv_sync_takes_the_cpu_build_and_cuda_excludes_it(pyproject: dict[str, Any]) -> None:
    uv = pyproject["tool"]["uv"]
    assert uv["default-groups"] == ["cpu"]
    assert [{"group": "cpu"}, {"group": "cu128"}] in uv["conflicts"]
    groups = pyproject["dependency-groups"]
    torch = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch>=")]
    assert groups["cpu"] == groups["cu128"] == torch


def test_uv_and_make_install_the_same_torch(pyproject: dict[str, Any]) -> None:
    assert pyproject["tool"]["uv"]["constraint-dependencies"] == [f"torch=={make_version()}"]
    # pip (`pip install -e ".[dev]"`) needs torch among the project's own dependencies.
    assert [d for d in pyproject["project"]["dependencies"] if d.startswith("torch>=")]
    assert "dev" in pyproject["project"]["optional-dependencies"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_cpu_branch_pins_the_cpu_build_from_the_cpu_index() -> None:
    # -n -B: print every command of a fresh set-up without running any.
    make = ["make", "-n", "-B", "install"]
    printed = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    cpu_branch = printed.split("No NVIDIA GPU", 1)[1].split("fi;", 1)[0]
    assert f'"torch=={make_version()}+cpu"' in cpu_branch
    assert f"--extra-index-url {CPU_INDEX}" in cpu_branch
    # Only torch is fetched there, quickly giving up on an index that is out of reach.
    assert "--no-deps" in cpu_branch
    assert re.search(r"--timeout \d+ --retries [01]\b", cpu_branch)
