"""The memory rows: RSS (and CUDA peak) growth over many apply/generate/remove cycles, and the
peak memory of a step with and without the LoRA set.

Split from :mod:`benchmarks.rows`, whose step and naive-path helpers they reuse; what each row
means is described in :mod:`benchmarks.lora_speed`.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import EulerDiscreteScheduler

from app.cores.lora_engine import LoRARequest
from app.cores.model_manager.pipeline_manager import DiffusionParams, PipelineManager
from benchmarks.measure import Bench, MiB, progress, rss_bytes, trimmed_rss_bytes
from benchmarks.models import weight_bytes
from benchmarks.peak_memory import peak_on_cpu, peak_on_cuda
from benchmarks.rows import make_unet_step, naive_load, naive_unload

CYCLE_PX = 64
MIN_CYCLES = 10


def _generate_cycle(manager: PipelineManager, requests: list[LoRARequest]) -> None:
    """Apply, generate one 1-step 64x64 image with CFG, remove."""
    params = DiffusionParams(
        prompt="a lighthouse on a cliff at sunset",
        negative_prompt="blurry",
        steps=1,
        cfg_scale=7.0,
        clip_skip=1,
        seeds=[0],
        scheduler=EulerDiscreteScheduler.from_config(dict(manager.scheduler_config)),
    )
    with manager.apply_loras(requests):
        manager.text_to_image(params, CYCLE_PX, CYCLE_PX, None)


def bench_memory(bench: Bench, max_cycles: int, budget_s: float) -> None:
    """RSS (and CUDA peak) growth between the first and the last of N cycles.

    N is ``max_cycles`` unless the cycles after the first take longer than ``budget_s``
    together; then as many as fit (at least ``MIN_CYCLES``).
    """
    manager, clock = bench.manager, bench.clock
    cuda = bench.device.type == "cuda"
    capped = ""
    if bench.spec.max_cycles is not None and bench.spec.max_cycles < max_cycles:
        max_cycles = bench.spec.max_cycles
        capped = f"; at most {max_cycles} for this model (seconds per cycle on a CPU)"
    times = [clock.ms(lambda: _generate_cycle(manager, bench.requests))]
    gc.collect()
    rss_first = rss_bytes()
    trimmed_first = trimmed_rss_bytes()
    peak_first = torch.cuda.max_memory_allocated(bench.device) if cuda else 0
    deadline = time.perf_counter() + budget_s
    while len(times) < max_cycles and (len(times) < MIN_CYCLES or time.perf_counter() < deadline):
        times.append(clock.ms(lambda: _generate_cycle(manager, bench.requests)))
    cycles = len(times)
    progress(f"  {cycles} cycles, median {statistics.median(times):.0f} ms")
    gc.collect()
    rss_last = rss_bytes()
    trimmed_last = trimmed_rss_bytes()
    model_bytes = weight_bytes(manager.pipeline)
    fewer = (
        f" (fewer than {max_cycles}: time budget {budget_s:.0f} s)" if cycles < max_cycles else ""
    )
    bench.timing(
        "cycle",
        f"cycle: apply 5 + generate (1 step, {CYCLE_PX} px, CFG) + remove",
        times[1:],
        f"{cycles} cycles{fewer}{capped}",
    )
    growth = rss_last - rss_first
    bench.note(
        f"memory: RSS growth after {cycles} cycles vs after the 1st",
        f"{growth / MiB:+.1f} MiB",
        f"{100 * growth / model_bytes:+.2f} % of the {model_bytes / MiB:.0f} MiB of weights; "
        f"RSS {rss_first / MiB:.0f} → {rss_last / MiB:.0f} MiB{fewer}",
    )
    if trimmed_first is not None and trimmed_last is not None:
        trimmed = trimmed_last - trimmed_first
        bench.note(
            f"memory: RSS growth after malloc_trim, {cycles} cycles vs the 1st",
            f"{trimmed / MiB:+.1f} MiB",
            f"{100 * trimmed / model_bytes:+.2f} % of the weights; "
            f"RSS {trimmed_first / MiB:.0f} → {trimmed_last / MiB:.0f} MiB",
        )
    if cuda:
        peak_last = torch.cuda.max_memory_allocated(bench.device)
        bench.note(
            f"memory: CUDA max_memory_allocated growth after {cycles} cycles",
            f"{(peak_last - peak_first) / MiB:+.1f} MiB",
            f"peak {peak_first / MiB:.0f} → {peak_last / MiB:.0f} MiB",
        )


def bench_peak_memory(bench: Bench) -> None:
    """Peak memory of one UNet step: base, inside a warm ``apply_loras`` (fuse 5 + step +
    restore) and on the naive path (load 5 adapters + step + unload); each above the memory
    in use just before it (:mod:`benchmarks.peak_memory`: CUDA's allocator peak on a GPU, the
    kernel's peak RSS, VmHWM, on the CPU). One sample each, after the timed rows."""
    manager = bench.manager
    step = make_unet_step(bench, bench.spec.step_px[bench.device.type])
    components = bench.spec.lora_components

    def ours() -> None:
        with manager.apply_loras(bench.requests):
            step()

    def naive() -> None:
        try:
            naive_load(manager.pipeline, bench.requests, components)
            step()
        finally:
            naive_unload(manager.pipeline)

    def peak(work: Callable[[], object]) -> tuple[int, str]:
        if bench.device.type == "cuda":
            return peak_on_cuda(work, bench.device)
        return peak_on_cpu(work)

    model_bytes = weight_bytes(manager.pipeline)
    base, base_notes = peak(step)
    where = "GPU (max_memory_allocated)" if bench.device.type == "cuda" else "RSS (VmHWM)"
    bench.note(f"peak memory: base step, {where}", f"+{base / MiB:.0f} MiB", base_notes)
    for name, work in (("5 LoRAs fused (ours, warm)", ours), ("5 PEFT adapters (naive)", naive)):
        used, notes = peak(work)
        extra = used - base
        bench.note(
            f"peak memory: apply {name} + step + remove, beyond the base step",
            f"{extra / MiB:+.0f} MiB",
            f"{100 * extra / model_bytes:+.2f} % of the {model_bytes / MiB:.0f} MiB of weights; "
            f"peak +{used / MiB:.0f} MiB; {notes}",
        )
