"""The CPU start-up settings (app.platform.cpu_runtime), checked in fresh processes: mallopt
changes the whole process's allocator, so what matters is what a new interpreter ends up
with."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.cores.model_manager.device import auto_device
from app.platform import cpu_runtime

ROOT = Path(__file__).resolve().parents[3]
INT_MAX = 2**31 - 1
_USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GLIBC_TUNABLES", "LD_PRELOAD")

# Run in the child: tune (or not), import torch, then report what the process has: the
# environment, the tuning, and what glibc does with a 64 MiB block (mallinfo2: hblks counts
# blocks served by their own mmap, arena the heap's bytes).
_CHILD = """
import ctypes, json, os, sys
from app.platform import cpu_runtime
torch_before = "torch" in sys.modules
tuning = cpu_runtime.tune_at_start_up({enabled}, {device!r}) if {tune} else None
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2()
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
while_held = libc.mallinfo2()
libc.free(block)
after_free = libc.mallinfo2()
released = cpu_runtime.release_free_memory()
after_trim = libc.mallinfo2()

def in_a_thread():  # where the app steps: a worker thread
    block = libc.malloc(48 << 20)
    ctypes.memset(block, 1, 48 << 20)
    libc.free(block)

import threading
worker = threading.Thread(target=in_a_thread)
worker.start()
worker.join()
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
print(json.dumps({{
    "torch_before": torch_before,
    "omp": {{k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}},
    "allocator": tuning.allocator if tuning else None,
    "skipped": tuning.skipped if tuning else None,
    "mmapped_blocks_added": while_held.hblks - before.hblks,
    "heap_after_free": after_free.arena,
    "heap_after_trim": after_trim.arena,
    "released": released,
}}))
"""

glibc_only = pytest.mark.skipif(
    cpu_runtime._glibc() is None, reason="mallopt and mallinfo2 are glibc's (Linux)"
)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the variables a user sets to choose for themselves."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _USER_VARIABLES and not key.startswith("MALLOC_")
    }
    return env | extra


def run_child(
    env: dict[str, str], *, tune: bool = True, enabled: bool = True, device: str = "cpu"
) -> dict[str, object]:
    """The child's report, with ``arenas``: how many malloc arenas glibc has at the end."""
    code = _CHILD.format(tune=tune, enabled=enabled, device=device)
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    result["arenas"] = completed.stderr.count("Arena ")
    return result


@glibc_only
def test_start_up_keeps_large_blocks_in_the_heap() -> None:
    result = run_child(clean_env())

    assert result["torch_before"] is False
    assert result["omp"] == {}  # OpenMP's wait policy is left as it is
    assert result["allocator"] == {
        "M_MMAP_MAX": 0,
        "M_TRIM_THRESHOLD": INT_MAX,
        "M_ARENA_MAX": 1,
    }
    # 64 MiB comes from the heap, not from its own mmap (which free would unmap) ...
    assert result["mmapped_blocks_added"] == 0
    # ... stays there once freed, ready for the next step ...
    assert isinstance(result["heap_after_free"], int)
    assert result["heap_after_free"] >= 64 << 20
    # ... and goes back to the OS when the app releases memory (a model unloaded).
    assert result["released"] is True
    assert isinstance(result["heap_after_trim"], int)
    assert result["heap_after_trim"] < result["heap_after_free"] - (32 << 20)
    # A worker thread allocates from the same heap, not from an arena of its own.
    assert result["arenas"] == 1


@glibc_only
@pytest.mark.skipif(auto_device().type != "cpu", reason="LOCALAI_DEVICE=auto picks a GPU here")
def test_with_the_default_device_setting_too() -> None:
    """``auto`` imports torch to look for a GPU before mallopt: still one arena after."""
    result = run_child(clean_env(), device="auto")

    assert result["omp"] == {}
    assert result["allocator"] == {
        "M_MMAP_MAX": 0,
        "M_TRIM_THRESHOLD": INT_MAX,
        "M_ARENA_MAX": 1,
    }
    assert result["mmapped_blocks_added"] == 0
    assert result["arenas"] == 1


@glibc_only
def test_without_tuning_glibc_maps_the_same_block_on_its_own() -> None:
    """What the settings change: glibc's default serves 64 MiB with its own mmap."""
    result = run_child(clean_env(), tune=False)

    assert result["omp"] == {}
    assert result["mmapped_blocks_added"] == 1
    arenas = result["arenas"]
    assert isinstance(arenas, int)
    assert arenas >= 2  # the worker thread has an arena of its own


@glibc_only
def test_values_the_user_set_are_kept() -> None:
    result = run_child(clean_env(OMP_WAIT_POLICY="ACTIVE", MALLOC_ARENA_MAX="2"))

    assert result["omp"] == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert result["allocator"] == {}
    assert result["mmapped_blocks_added"] == 1
    skipped = result["skipped"]
    assert isinstance(skipped, list)
    assert any("MALLOC_ARENA_MAX" in reason for reason in skipped)


def test_allocator_tunables_or_another_allocator_count_as_the_users_choice() -> None:
    for env in (
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"},
        {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
    ):
        tuning = cpu_runtime.CpuTuning()

        cpu_runtime.configure_allocator(tuning, env)

        assert tuning.allocator == {}
        assert tuning.skipped == [f"glibc allocator left as set by the user ({next(iter(env))})"]


@glibc_only
def test_turned_off_or_on_a_gpu_the_allocator_is_left_alone() -> None:
    off = run_child(clean_env(), enabled=False)
    gpu = run_child(clean_env(), device="cuda")

    assert off["omp"] == {}
    assert off["allocator"] == {}
    assert off["mmapped_blocks_added"] == 1
    assert gpu["allocator"] == {}
    assert gpu["mmapped_blocks_added"] == 1


def test_elsewhere_than_glibc_nothing_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    tuning = cpu_runtime.CpuTuning()

    cpu_runtime.configure_allocator(tuning, {})

    assert tuning.allocator == {}
    assert tuning.skipped == ["allocator not tuned: not Linux with glibc"]
    assert cpu_runtime.release_free_memory() is False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_python_m_app_tunes_then_serves(tmp_path: Path) -> None:
    env = clean_env(
        LOCALAI_CACHE_DIR=str(tmp_path),
        LOCALAI_PORT=str(_free_port()),
        LOCALAI_DEVICE="cpu",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert server.stderr is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = server.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "Application startup complete" in line:
                break
    finally:
        server.terminate()
        server.wait(timeout=60)
    log = "".join(lines)
    assert "Application startup complete" in log, log
    if cpu_runtime._glibc() is not None:
        settings = f"M_MMAP_MAX=0, M_TRIM_THRESHOLD={INT_MAX}, M_ARENA_MAX=1"
        assert f"CPU tuning: glibc mallopt {settings}" in log
