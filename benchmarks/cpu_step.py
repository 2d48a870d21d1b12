"""One SD 1.5-sized UNet step on the CPU, before and after the backend's start-up tuning.

Run with ``make bench`` or::

    .venv/bin/python -m benchmarks.cpu_step [--steps N] [--json PATH] [--cache-dir PATH]

Each variant runs in its own child process, so that neither inherits the other's allocator
state or OpenMP settings:

* ``untuned``: glibc's defaults (and whatever the calling environment sets).
* ``tuned``: :func:`app.platform.cpu_runtime.tune_at_start_up` first, as ``python -m app``
  does (glibc's ``mallopt``, before torch is imported).

Each child loads the SD 1.5-sized UNet (:mod:`benchmarks.models`, fp32), runs one warm-up
step and ``--steps`` timed steps: one UNet forward on a classifier-free-guidance batch of 2 at
512x512 px (64x64 latents), the unit of the denoising loop. Per step it records the wall time,
the minor page faults (``getrusage`` ``ru_minflt``) and the CPU seconds of the process. Then
it measures the machine's fp32 matmul rate (a 2048^3 ``torch.mm`` into a preallocated output,
best of 20) and counts one step's FLOPs (``torch.utils.flop_counter.FlopCounterMode``:
matmuls and convolutions, plus the CPU attention kernel's, which it does not know by itself;
nearly all of a UNet's work): the achieved fraction is FLOPs / median step time / matmul
rate. The steps run in a worker thread, as in the app.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.measure import Row

# The child must not import torch before the start-up tuning: the benchmark modules that do
# (measure, models, results) are imported in the parent's functions only.
SD15_LABEL = "SD1.5-sized"
RESULTS_PATH = Path(__file__).parent / "results" / "latest.json"
PX = 512
MATMUL_N = 2048
# Best of 20 (about 1 s): on a shared machine best of 5 varied by 2x between processes.
MATMUL_REPEATS = 20
_RESULT_MARK = "CPU_STEP_RESULT "
VARIANTS = {
    "untuned": "untuned: glibc's defaults",
    "tuned": "tuned at start-up (app.platform.cpu_runtime)",
}


# ---------------------------------------------------------------------------------------------
# Child process


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rss_mib() -> float:
    """Resident set size now (Linux), MiB; 0 where /proc is missing."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(variant: str, model_dir: Path, steps: int) -> dict[str, Any]:
    """Measure one variant in this (fresh) process; torch is imported only here."""
    tuning: dict[str, Any] = {}
    if variant == "tuned":
        from app.platform.cpu_runtime import tune_at_start_up

        done = tune_at_start_up(True, "cpu")
        tuning = {"allocator": done.allocator, "skipped": done.skipped}
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(
        str(model_dir / "unet"), torch_dtype=torch.float32
    ).eval()
    side = PX // 8
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, side, side, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor(500)

    def step() -> None:
        with torch.no_grad():
            unet(latents, timestep, encoder_hidden_states=context)

    # Like the app, which steps in a worker thread (anyio's): glibc gives a thread its own
    # arena, so where the step runs changes what the allocator does.
    worker = ThreadPoolExecutor(max_workers=1)
    records: list[dict[str, float]] = []
    for index in range(steps + 1):  # step 0 is the warm-up
        faults, cpu, start = _minor_faults(), _cpu_seconds(), time.perf_counter()
        worker.submit(step).result()
        wall = time.perf_counter() - start
        record = {
            "ms": wall * 1000,
            "faults": _minor_faults() - faults,
            "cpu_s": _cpu_seconds() - cpu,
        }
        print(f"[{variant}] step {index}: {record}", file=sys.stderr, flush=True)
        if index > 0:
            records.append(record)

    rss_after_steps = _rss_mib()
    a = torch.randn(MATMUL_N, MATMUL_N)
    b = torch.randn(MATMUL_N, MATMUL_N)
    out = torch.empty(MATMUL_N, MATMUL_N)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(MATMUL_REPEATS):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    matmul_flops_per_s = 2 * MATMUL_N**3 / best

    def cpu_attention_flops(
        query: Any, key: Any, value: Any, *_args: Any, out_shape: Any = None, **_kwargs: Any
    ) -> int:
        """Q K^T and (softmax) V: two batched matmuls, 2 FLOPs per multiply-add (shapes)."""
        batch, heads, queries, depth = query
        keys, value_depth = key[-2], value[-1]
        return int(2 * batch * heads * queries * keys * (depth + value_depth))

    # FlopCounterMode knows the CUDA attention kernels, not the CPU's, which would leave out
    # a sixth of the step's FLOPs (0.26 of 1.61 TFLOP at 512x512).
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with FlopCounterMode(display=False, custom_mapping={cpu_attention: cpu_attention_flops}) as (
        counter
    ):
        step()  # in this thread: the mode sees only its own thread's operations
    worker.shutdown()
    return {
        "variant": variant,
        "steps": records,
        "step_flops": counter.get_total_flops(),
        "matmul_flops_per_s": matmul_flops_per_s,
        "threads": torch.get_num_threads(),
        "rss_mib": rss_after_steps,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "tuning": tuning,
    }


# ---------------------------------------------------------------------------------------------
# Parent: one child per variant, the table and the JSON rows


def measure_variant(variant: str, model_dir: Path, steps: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.cpu_step", "--child", variant]
    command += ["--model-dir", str(model_dir), "--steps", str(steps)]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    for line in completed.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            result: dict[str, Any] = json.loads(line.removeprefix(_RESULT_MARK))
            return result
    raise RuntimeError(f"the {variant} child printed no result")


def variant_rows(result: dict[str, Any]) -> list[Row]:
    from benchmarks.measure import Row, spread

    label = VARIANTS[result["variant"]]
    steps = result["steps"]
    times = [record["ms"] for record in steps]
    faults = statistics.median(record["faults"] for record in steps)
    cpu_s = statistics.median(record["cpu_s"] for record in steps)
    median = statistics.median(times)
    low, high, kind = spread(times)
    rate = result["matmul_flops_per_s"]
    achieved = result["step_flops"] / (median / 1000)
    tuning = result["tuning"]
    settings = ", ".join(
        [f"mallopt {k}={v}" for k, v in tuning.get("allocator", {}).items()]
        + list(tuning.get("skipped", []))
        + [f"OMP_WAIT_POLICY {result['omp_wait_policy']}"]
    )
    model = SD15_LABEL
    return [
        Row(
            model,
            f"step 512x512, {label}",
            f"{median:.1f} ms",
            f"{low:.1f}–{high:.1f} ({kind}, n={len(times)})",
            f"CFG batch 2, fp32, {result['threads']} threads; CPU {cpu_s:.1f} s per step; "
            f"RSS after the steps {result.get('rss_mib', 0):.0f} MiB; " + settings,
            median_ms=median,
            min_ms=min(times),
            max_ms=max(times),
            samples=len(times),
        ),
        Row(
            model,
            f"minor page faults per step, {result['variant']}",
            f"{faults:,.0f}",
            "—",
            "per step: " + ", ".join(f"{record['faults']:,}" for record in steps),
        ),
        Row(
            model,
            f"fraction of the matmul rate, {result['variant']}",
            f"{100 * achieved / rate:.0f} %",
            "—",
            f"{result['step_flops'] / 1e12:.2f} TFLOP per step at the median step time = "
            f"{achieved / 1e9:.0f} GFLOP/s; fp32 matmul rate {rate / 1e9:.0f} GFLOP/s "
            f"({MATMUL_N}^3 torch.mm, best of {MATMUL_REPEATS}, same process)",
        ),
    ]


def _machine_busy_s() -> float:
    """CPU seconds all processes used since boot (psutil's busy fields)."""
    import psutil

    times = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return float(sum(getattr(times, name, 0.0) for name in fields))


def _own_and_children_cpu_s() -> float:
    """CPU seconds of this process and its finished children (the measured variants)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def table(rows: list[Row]) -> str:
    lines = ["| model | row | median | spread | notes |", "|---|---|---:|---|---|"]
    lines += [f"| {r.model} | {r.name} | {r.median} | {r.spread} | {r.notes} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--json", type=Path, default=RESULTS_PATH, help="results file")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        result = run_child(args.child, args.model_dir, args.steps)
        print(_RESULT_MARK + json.dumps(result), flush=True)
        return 0
    from benchmarks.measure import Row
    from benchmarks.models import MODELS, prepare_model
    from benchmarks.results import cpu_name, load_line, local_time, write_section

    model_dir, built_s = prepare_model(MODELS["sd15"], args.cache_dir)
    if built_s is not None:
        print(f"Built the SD1.5-sized model in {built_s:.0f} s", file=sys.stderr)
    load_before = load_line("before")
    machine_busy, own_cpu, wall = _machine_busy_s(), _own_and_children_cpu_s(), time.time()
    results = [measure_variant(variant, model_dir, args.steps) for variant in VARIANTS]
    others_s = (_machine_busy_s() - machine_busy) - (_own_and_children_cpu_s() - own_cpu)
    busy = max(0.0, 100 * others_s / ((time.time() - wall) * (os.cpu_count() or 1)))
    rows = [row for result in results for row in variant_rows(result)]
    rows.append(
        Row(SD15_LABEL, "machine: CPU used by other processes meanwhile", f"{busy:.0f} %", "—")
    )
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    load = f"{load_before}; {load_line('after')}"
    print(f"CPU step benchmark, {local_time()}: {machine}; {load}")
    print(table(rows))
    write_section(args.json, "cpu_step", device="cpu", machine=machine, load=load, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
