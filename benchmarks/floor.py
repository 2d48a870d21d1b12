"""The floor no LoRA apply can beat, from the machine's own rates measured in the same run.

Fusing a set reads the LoRAs' factors once and reads and writes every weight they touch
(memory traffic), and multiplies the stacked factors of each weight (matmul FLOPs). The floor
is the larger of the two times, at the memory bandwidth (a large ``copy_``, read + write) and
the matmul rate (a square ``mm`` in the weights' dtype) measured on this machine in each
round, next to the rows they are compared with; the floor takes the best of each. Used by
:mod:`benchmarks.rows`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.cores.lora_engine.layer_math import layer_rank
from app.cores.lora_engine.preparation import PreparedLoRA
from benchmarks.measure import MiB

_COPY_BYTES = 256 * MiB
"""Far larger than the last-level cache: the copy runs at memory speed."""


def touched_weights(
    pipeline: Any, entries: Sequence[PreparedLoRA]
) -> dict[tuple[str, str], torch.Tensor]:
    """The weight tensors the LoRAs change, each once, by (component, module name)."""
    keys = {
        (target.component, target.module)
        for entry in entries
        for prepared in entry.layers
        for target in prepared.targets
    }
    weights = {}
    for component, module_name in sorted(keys):
        weight = getattr(pipeline, component).get_submodule(module_name).weight
        assert isinstance(weight, torch.Tensor)
        weights[(component, module_name)] = weight.detach()
    return weights


def fusion_flop(
    entries: Sequence[PreparedLoRA], weights: dict[tuple[str, str], torch.Tensor]
) -> float:
    """Multiply-adds of the fused deltas (2 x rows x rank x columns per layer target)."""
    total = 0
    for entry in entries:
        for prepared in entry.layers:
            rank = layer_rank(prepared.layer) or 0
            for target in prepared.targets:
                weight = weights[(target.component, target.module)]
                rows = (
                    weight.shape[0] if target.rows is None else target.rows.stop - target.rows.start
                )
                total += 2 * rows * (weight.numel() // weight.shape[0]) * rank
    return float(total)


@dataclass(frozen=True)
class FloorSample:
    bandwidth_gbs: float
    """Bytes read + written per second by a large ``copy_``, in GB/s (1e9)."""
    matmul_gflops: float
    """A square ``mm``'s rate in the weights' dtype, in GFLOP/s."""
    memory_ms: float
    compute_ms: float

    @property
    def floor_ms(self) -> float:
        return max(self.memory_ms, self.compute_ms)


class Floor:
    """A LoRA set's work (bytes moved, FLOPs) and this machine's rates, measured on demand."""

    def __init__(self, pipeline: Any, entries: Sequence[PreparedLoRA], device: torch.device):
        touched = touched_weights(pipeline, entries)
        weights = list(touched.values())
        self.lora_bytes = sum(entry.nbytes for entry in entries)
        self.touched_bytes = sum(w.numel() * w.element_size() for w in weights)
        self.touched_count = len(weights)
        self.traffic_bytes = self.lora_bytes + 2 * self.touched_bytes
        self.flop = fusion_flop(entries, touched)
        self.dtype = weights[0].dtype
        self._device = device
        self._source = torch.ones(_COPY_BYTES // 4, device=device)
        self._target = torch.empty_like(self._source)
        side = 4096 if device.type == "cuda" else 2048
        self._a = torch.randn(side, side, device=device).to(self.dtype)
        self._b = torch.randn(side, side, device=device).to(self.dtype)
        self._product = torch.empty_like(self._a)
        self.measure()  # warm-up: faults the buffers in, loads the kernels

    def _timed_s(self, work: Any) -> float:
        """The best of three runs: a rate is what the machine can do, not what it did once."""
        best = float("inf")
        for _ in range(3):
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            start = time.perf_counter()
            work()
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            best = min(best, time.perf_counter() - start)
        return best

    def measure(self) -> FloorSample:
        copy_s = self._timed_s(lambda: self._target.copy_(self._source))
        mm_s = self._timed_s(lambda: torch.mm(self._a, self._b, out=self._product))
        bandwidth = 2 * _COPY_BYTES / copy_s
        rate = 2 * self._a.shape[0] ** 3 / mm_s
        return FloorSample(
            bandwidth_gbs=bandwidth / 1e9,
            matmul_gflops=rate / 1e9,
            memory_ms=1000 * self.traffic_bytes / bandwidth,
            compute_ms=1000 * self.flop / rate,
        )

    def at_best_rates(self, samples: Sequence[FloorSample]) -> FloorSample:
        """The floor at the best bandwidth and matmul rate of all rounds: what the machine can
        do (a shared machine's rounds vary, bfloat16 matmuls up to 2.6x between rounds)."""
        bandwidth = max(s.bandwidth_gbs for s in samples) * 1e9
        rate = max(s.matmul_gflops for s in samples) * 1e9
        return FloorSample(
            bandwidth_gbs=bandwidth / 1e9,
            matmul_gflops=rate / 1e9,
            memory_ms=1000 * self.traffic_bytes / bandwidth,
            compute_ms=1000 * self.flop / rate,
        )

    def describe(self, best: FloorSample) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"max of memory {best.memory_ms:.1f} ms (LoRA factors {self.lora_bytes / MiB:.1f} "
            f"MiB read + {self.touched_count} touched tensors {self.touched_bytes / MiB:.1f} MiB "
            f"read and written, at {best.bandwidth_gbs:.1f} GB/s) and compute "
            f"{best.compute_ms:.1f} ms ({self.flop / 1e9:.3g} GFLOP at "
            f"{best.matmul_gflops:.0f} GFLOP/s {dtype} matmul)"
        )
