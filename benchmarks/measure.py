"""Timing, statistics, memory and machine-load helpers, and the per-model result table state.

:class:`Clock` times work in milliseconds (synchronising CUDA), :func:`spread` gives a sample's
p10–p90 or min–max, :class:`Bench` collects one model's rows, :class:`OtherProcesses` measures
how busy the shared machine was, and :func:`rss_bytes` / :func:`trimmed_rss_bytes` read the
resident set size. Used by :mod:`benchmarks.rows` and :mod:`benchmarks.lora_speed`.
"""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from app.cores.lora_engine import LoRARequest
from app.cores.model_manager.pipeline_manager import PipelineManager
from benchmarks.models import ModelSpec

MiB = 1024 * 1024


@dataclass(frozen=True)
class Clock:
    """Wall-clock milliseconds, synchronising CUDA so that queued kernels are counted."""

    device: torch.device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() * 1000.0

    def ms(self, work: Callable[[], object]) -> float:
        start = self.now()
        work()
        return self.now() - start

    def enter_exit_ms(self, manager: contextlib.AbstractContextManager[Any]) -> tuple[float, float]:
        """(enter, exit) times of a context manager with an empty body."""
        start = self.now()
        manager.__enter__()
        entered = self.now()
        manager.__exit__(None, None, None)
        return entered - start, self.now() - entered


def spread(samples: Sequence[float]) -> tuple[float, float, str]:
    """(low, high, kind): p10–p90 from 10 samples on, else min–max."""
    if len(samples) >= 10:
        deciles = statistics.quantiles(samples, n=10, method="inclusive")
        return deciles[0], deciles[-1], "p10–p90"
    return min(samples), max(samples), "min–max"


@dataclass(frozen=True)
class Row:
    model: str
    name: str
    median: str
    spread: str
    notes: str = ""
    median_ms: float | None = None
    """The numbers behind ``median`` and ``spread`` for timed rows (None for notes)."""
    min_ms: float | None = None
    max_ms: float | None = None
    samples: int | None = None
    unit: str = "ms"

    def as_json(self) -> dict[str, object]:
        """The row for ``benchmarks/results/latest.json``: a script can compare runs."""
        return {
            "model": self.model,
            "row": self.name,
            "median": self.median_ms,
            "min": self.min_ms,
            "max": self.max_ms,
            "unit": self.unit if self.median_ms is not None else None,
            "samples": self.samples,
            "value": self.median,
            "spread": self.spread,
            "notes": self.notes,
        }


@dataclass
class Bench:
    """One model's benchmark state and results."""

    spec: ModelSpec
    manager: PipelineManager
    requests: list[LoRARequest]
    clock: Clock
    repeats: int
    rows: list[Row] = field(default_factory=list)
    medians: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.clock.device

    def timing(
        self, key: str, name: str, samples: Sequence[float], notes: str = "", unit: str = "ms"
    ) -> float:
        median = statistics.median(samples)
        low, high, kind = spread(samples)
        self.medians[key] = median
        self.rows.append(
            Row(
                self.spec.label,
                name,
                f"{median:.1f} {unit}",
                f"{low:.1f}–{high:.1f} ({kind}, n={len(samples)})",
                notes,
                median_ms=median,
                min_ms=min(samples),
                max_ms=max(samples),
                samples=len(samples),
                unit=unit,
            )
        )
        return median

    def note(self, name: str, value: str, notes: str) -> None:
        self.rows.append(Row(self.spec.label, name, value, "—", notes))


class OtherProcesses:
    """How busy the machine was with work other than this process, since creation."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._all = self._busy_all()
        self._own = self._busy_own()

    @staticmethod
    def _busy_all() -> float:
        times = psutil.cpu_times()
        return float(sum(getattr(times, name, 0.0) for name in _BUSY_FIELDS))

    @staticmethod
    def _busy_own() -> float:
        times = psutil.Process().cpu_times()
        return float(times.user + times.system)

    def percent(self) -> float:
        """CPU seconds used by other processes, as a percentage of all cores' time."""
        others = (self._busy_all() - self._all) - (self._busy_own() - self._own)
        capacity = (time.perf_counter() - self._wall) * (psutil.cpu_count() or 1)
        return max(0.0, 100 * others / capacity)


_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def trimmed_rss_bytes() -> int | None:
    """RSS after glibc's ``malloc_trim`` hands freed heap pages back (None without glibc).

    Fusing allocates and frees hundreds of MiB per request on a large model, and whether
    glibc keeps those pages moves the raw RSS by as much: trimmed, RSS shows what is live.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss_bytes()
