"""Peak memory of one call: on CUDA from the allocator's statistics, on the CPU from the
kernel's high-water mark of resident memory (``VmHWM``, reset through
``/proc/self/clear_refs``), cross-checked by sampling RSS in a thread."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from benchmarks.measure import MiB, rss_bytes

SAMPLE_INTERVAL_S = 0.002


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _peak_rss() is not None


def _peak_rss() -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


class RssSampler:
    """The largest RSS seen by a background thread sampling every ``interval`` seconds."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, int(process.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def peak_on_cpu(work: Callable[[], object]) -> tuple[int, str]:
    """(RSS growth from just before ``work`` to its peak during it, notes)."""
    gc.collect()
    _malloc_trim()
    baseline = rss_bytes()
    kernel_peak = _reset_peak_rss()
    with RssSampler() as sampler:
        work()
    after = rss_bytes()
    sampled = sampler.peak - baseline
    base = f"RSS before {baseline / MiB:.0f} MiB, after {after / MiB:.0f} MiB"
    peak = _peak_rss() if kernel_peak else None
    if peak is None:
        return sampled, f"RSS sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms; {base}"
    return peak - baseline, (
        f"VmHWM; sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms: {sampled / MiB:.0f} MiB; {base}"
    )


def peak_on_cuda(work: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """(max_memory_allocated during ``work`` minus memory_allocated before it, notes)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    allocated = torch.cuda.memory_allocated(device)
    reserved = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    work()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - allocated
    reserved_peak = torch.cuda.max_memory_reserved(device) - reserved
    return peak, (
        f"max_memory_allocated; reserved grew by up to {reserved_peak / MiB:.0f} MiB; "
        f"allocated before {allocated / MiB:.0f} MiB"
    )
