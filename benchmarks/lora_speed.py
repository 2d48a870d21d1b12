"""LoRA speed and memory: Plan 006's naive diffusers path against the engine's prepare-and-fuse
path.

Run with ``make bench`` or::

    .venv/bin/python -m benchmarks.lora_speed [--device auto|cpu|cuda] [--repeats N]
        [--models tiny,sd15,sdxl] [--cache-dir PATH] [--output PATH] [--cycles N]
        [--cycle-budget-s S]

The models, measured one after the other in the same process (by default all three; the
SDXL-sized one adds about 9 minutes and 11 GiB of peak RSS on a 2-core CPU):

* ``tiny``: the app's embedded default model (``<cache>/models/embedded--tiny-sd``).
* ``sd15``: a pipeline with Stable Diffusion 1.5's real UNet, text-encoder and VAE configs and
  seeded random weights, built once into ``<cache>/models/bench--sd15-shaped`` (fp16 on disk,
  loaded as fp32 on the CPU and fp16 on CUDA). Nothing is downloaded.
* ``sdxl``: SDXL base 1.0's real UNet, both text encoders (CLIP-L and OpenCLIP bigG) and VAE
  with seeded weights (:mod:`benchmarks.sdxl_model`), built once into
  ``<cache>/models/bench--sdxl-shaped`` (fp16 on disk, ~7 GB, about 1.5 min); loaded as bf16 on
  the CPU (the header says whether the CPU has AMX-BF16, which makes bf16 matmuls fast) and
  fp16 on CUDA. Its cycle rows run at most 10 cycles (:attr:`ModelSpec.max_cycles`).

For each model the test factory writes five rank-32 LoRAs for the UNet and the text
encoder(s) (SDXL: both; Kohya and PEFT files alternating) into a temporary folder; they are
applied with weight 0.5.

Rows (median and spread over the repeats, by default 20 on the tiny model, 5 on the
SD 1.5-sized one and 3 on the SDXL-sized one; spread is p10–p90 with 10 or more samples, else
min–max):

``naive: apply 5`` / ``naive: remove`` / ``naive: apply + remove``
    The baseline, Plan 006 itself on the same pipeline: five ``load_lora_weights`` and one
    ``set_adapters``, then ``unload_lora_weights``.
``app, cache off``
    What the app does with ``LOCALAI_LORA_CACHE_MAX_COUNT=0``: enter and exit the engine's
    ``applied`` with a disabled ``LoRACache``; each file is prepared (read and mapped onto the
    model, which is the fit check) on every request, then the plain files go through Plan 006.
``ours: cold``
    The engine with an emptied ``LoRACache``: enter and exit ``apply_loras`` once, for LoRA
    files not seen before (each is prepared: read and mapped onto the model; then the set is
    fused and the weights restored).
``ours: warm, the same set again``
    The same set at the same weights again (a user generating again): on the CPU the engine's
    buffers still hold the set's fused weights and are swapped back in; on a GPU it fuses.
``ours: warm, all 5 at other weights``
    The same five LoRAs at 1.2x their weights (a user moving a slider): all prepared, the
    whole set fused on enter and restored on exit. This is the row the floor is for.
``ours: switch {1,2,3} <-> {3,4,5}``
    Alternating two prepared sets that share one LoRA; one sample is one set's enter + exit.
``floor``
    What no apply can beat (:mod:`benchmarks.floor`): the larger of the memory traffic (the
    set's LoRA factors read once, the touched weights read and written once) at the memory
    bandwidth and the fusion's matmul FLOPs at the matmul rate, both rates measured in each
    round of this run, the best of each taken (rows ``machine: memory bandwidth`` and
    ``machine: matmul rate``).
``step: base`` / ``step: 5 fused (ours)`` / ``step: 5 unfused adapters (naive)``
    One UNet forward on a classifier-free-guidance batch of 2, the unit of the denoising loop
    (64x64 px on the CPU; on CUDA 512x512 px for SD 1.5, 1024x1024 for SDXL, whose UNet also
    gets its pooled-text and size conditions): without LoRAs, inside
    ``apply_loras`` (fused) and with the five loaded as PEFT adapters (Plan 006). The
    notes check that fused and unfused agree and that the base output is bit-identical
    afterwards. On the CPU a step's time also depends on glibc's allocator state: in some
    processes every SD 1.5-sized step page-faults ~1.7 GiB of freshly mapped buffers again
    (~450k minor faults, +30-40 %), in others none, whatever the LoRAs; a fused/base gap that
    varies between runs is that, not the weights.
``peak memory``
    One sample each, after the step rows: the peak memory of a base step above the memory in
    use just before it, and how much higher the peak is when the step runs inside a warm
    ``apply_loras`` (fuse 5 + step + restore: the backups, the fusion's temporaries) or on the
    naive path (load 5 adapters + step + unload). On CUDA ``torch.cuda.max_memory_allocated``;
    on the CPU the kernel's peak resident set (``VmHWM``, reset through
    ``/proc/self/clear_refs``), cross-checked by sampling RSS every 2 ms
    (:mod:`benchmarks.peak_memory`).
``cycle`` / ``memory: RSS growth``
    Apply / generate (1 step, 64x64 px, CFG, through ``text_to_image``) / remove on the fast path,
    repeated; the resident set size (psutil) after the last cycle minus after the first, in MiB
    and as a share of the model's weights. On CUDA also the growth of
    ``torch.cuda.max_memory_allocated``. On a slow machine the SD 1.5-sized model runs fewer
    cycles than asked (as many as fit in ``--cycle-budget-s``); the row says how many. A second
    memory row measures RSS after glibc's ``malloc_trim``: freed heap pages that glibc keeps
    (hundreds of MiB per request on a large model) move the raw RSS either way.

The machine is often shared: every variant is measured in each round (round 0 is a warm-up),
so that a change in load hits them alike, and the header shows the load average.

This module holds the command line, the per-model orchestration and the table; the models and
the LoRA set are in :mod:`benchmarks.models`, the timing and memory helpers in
:mod:`benchmarks.measure` and the rows themselves in :mod:`benchmarks.rows` (apply/remove,
steps) and :mod:`benchmarks.memory_rows` (cycles, peak memory).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import diffusers
import peft
import psutil
import torch

from app.logging_setup import configure_logging
from app.platform import cpu_runtime
from benchmarks.measure import Bench, Clock, OtherProcesses, Row, progress
from benchmarks.memory_rows import bench_memory, bench_peak_memory
from benchmarks.models import MODELS, ModelSpec, load_manager, prepare_model, write_lora_set
from benchmarks.results import DEFAULT_PATH, cpu_name, load_line, local_time, write_section
from benchmarks.rows import bench_apply_remove, bench_steps

# ---------------------------------------------------------------------------------------------
# Report


def speedup(naive_ms: float, ours_ms: float) -> str:
    if ours_ms <= naive_ms:
        return f"{naive_ms / ours_ms:.1f}x faster"
    return f"{ours_ms / naive_ms:.1f}x slower"


def summary_lines(bench: Bench) -> list[str]:
    """Speed-ups against the naive path and the per-step overhead, in words (medians)."""
    m = bench.medians
    label = bench.spec.label
    return [
        f"- {label}: against naive apply + remove ({m['naive']:.1f} ms): the same set again "
        f"{speedup(m['naive'], m['warm'])} ({m['warm']:.1f} ms); all 5 at other weights "
        f"{speedup(m['naive'], m['reweight'])} ({m['reweight']:.1f} ms, "
        f"{m['reweight'] / m['floor']:.1f}x the floor); switching {{1,2,3}} <-> {{3,4,5}} "
        f"{speedup(m['naive'], m['switch'])} ({m['switch']:.1f} ms); cold "
        f"{speedup(m['naive'], m['cold'])} ({m['cold']:.1f} ms).",
        f"- {label}: per step, 5 fused {100 * (m['step_fused'] / m['step_base'] - 1):+.1f} % vs "
        f"base ({m['step_fused']:.1f} vs {m['step_base']:.1f} ms); 5 unfused adapters "
        f"{100 * (m['step_unfused'] / m['step_base'] - 1):+.1f} % ({m['step_unfused']:.1f} ms).",
        f"- {label}: with the cache off the app's apply + remove is {m['cache_off']:.1f} ms "
        f"({speedup(m['naive'], m['cache_off'])} than naive; each file is prepared, then loaded "
        "the naive way).",
    ]


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def cpu_has_amx_bf16() -> bool:
    """Whether the CPU has AMX-BF16 tiles (Sapphire Rapids and later), which oneDNN uses for
    bf16 matmuls; False where /proc/cpuinfo cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any("amx_bf16" in line.split() for line in cpuinfo if line.startswith("flags"))
    except OSError:
        return False


def dtype_words(device: torch.device, specs: Sequence[ModelSpec]) -> str:
    """The weights' dtype per model on ``device``: "fp32" or "fp32 (tiny, sd15), bf16 (sdxl)"."""
    by_dtype: dict[str, list[str]] = {}
    for spec in specs:
        by_dtype.setdefault(_short(spec.dtype(device)), []).append(spec.key)
    if len(by_dtype) == 1:
        words = next(iter(by_dtype))
    else:
        words = ", ".join(f"{name} ({', '.join(keys)})" for name, keys in by_dtype.items())
    if device.type == "cpu" and "bf16" in by_dtype:
        amx = "with AMX-BF16" if cpu_has_amx_bf16() else "without AMX: bf16 matmuls are slow"
        words += f"; CPU {amx}"
    return words


def machine_line(device: torch.device, dtypes: str | None = None) -> str:
    """The machine, the libraries and the device; ``dtypes`` as :func:`dtype_words` gives them
    (default: fp32 on a CPU, fp16 on CUDA)."""
    where = f"{device.type}, {dtypes or 'fp32'}"
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)}), {dtypes or 'fp16'}"
    omp = os.environ.get("OMP_WAIT_POLICY", "default")
    return (
        f"Machine: {cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch "
        f"threads, OMP_WAIT_POLICY {omp}), torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, peft {peft.__version__}; device {where}; {local_time()}"
    )


def render(header: Sequence[str], rows: Sequence[Row], footer: Sequence[str]) -> str:
    lines = [
        "# LoRA apply/remove benchmark",
        "",
        *header,
        "",
        "| model | row | median | spread | notes |",
        "|---|---|---:|---|---|",
    ]
    lines += [f"| {r.model} | {r.name} | {r.median} | {r.spread} | {r.notes} |" for r in rows]
    return "\n".join([*lines, "", *footer, ""])


# ---------------------------------------------------------------------------------------------
# Main


def run_model(
    spec: ModelSpec, args: argparse.Namespace, device: torch.device
) -> tuple[Bench, float | None]:
    progress(f"{spec.label}: preparing the model")
    model_dir, built_s = prepare_model(spec, args.cache_dir)
    if built_s is not None:
        progress(f"  built in {built_s:.0f} s")
    started = time.perf_counter()
    manager = load_manager(spec, model_dir, device)
    progress(f"  loaded in {time.perf_counter() - started:.1f} s")
    repeats = args.repeats or spec.default_repeats
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as folder:
        requests = write_lora_set(manager.pipeline, Path(folder), spec.key, spec.lora_components)
        bench = Bench(spec, manager, requests, Clock(device), repeats)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("apply/remove rounds", lambda: bench_apply_remove(bench)),
            ("step rounds", lambda: bench_steps(bench)),
            ("peak memory", lambda: bench_peak_memory(bench)),
            ("memory", lambda: bench_memory(bench, args.cycles, args.cycle_budget_s)),
        ]
        busy = OtherProcesses()
        for name, work in steps:
            progress(f"  {name}")
            work()
        bench.note(
            "machine: CPU used by other processes meanwhile",
            f"{busy.percent():.0f} %",
            f"of {psutil.cpu_count()} cores over this model's rows; more than a few % inflates "
            "the timings, the fast path's (many multi-threaded tensor ops) far more than naive's",
        )
    manager.close()
    return bench, built_s


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="samples per row (default: tiny 20, sd15 5, sdxl 3)",
    )
    parser.add_argument(
        "--models", default="tiny,sd15,sdxl", help="comma-separated: tiny, sd15, sdxl"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("LOCALAI_CACHE_DIR", ".cache")),
        help="models are built under <cache>/models (default: $LOCALAI_CACHE_DIR or .cache)",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_PATH,
        help="write the rows as JSON here (default: benchmarks/results/latest.json)",
    )
    parser.add_argument("--cycles", type=int, default=100, help="apply/generate/remove cycles")
    parser.add_argument(
        "--cycle-budget-s",
        type=float,
        default=180.0,
        help="run fewer cycles when they would take longer than this (seconds per model)",
    )
    parser.add_argument(
        "--no-cpu-tuning",
        dest="cpu_tuning",
        action="store_false",
        help="leave glibc's allocator as it is (the app tunes it when the CPU computes)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch")
    keys = [key.strip() for key in args.models.split(",") if key.strip()]
    unknown = [key for key in keys if key not in MODELS]
    if unknown or not keys:
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    args.models = keys
    return args


def quiet_libraries() -> None:
    """The benchmark's stdout is the table: silence the libraries' per-call noise."""
    configure_logging("WARNING")
    diffusers.utils.logging.disable_progress_bar()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for category in (DeprecationWarning, FutureWarning, UserWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    # As the app does at start-up (python -m app), so that steps are measured as users get them.
    tuning = cpu_runtime.tune_at_start_up(args.cpu_tuning, args.device)
    started = time.perf_counter()
    load_at_start = load_line("at start")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    rows: list[Row] = []
    footer = ["Summary:"]
    for key in args.models:
        bench, built_s = run_model(MODELS[key], args, device)
        rows += bench.rows
        footer += summary_lines(bench)
        if MODELS[key].build is not None:
            footer.append(
                f"- {MODELS[key].label} model build: "
                + (f"{built_s:.0f} s (this run)" if built_s is not None else "reused from cache")
            )
        gc.collect()
    footer.append(f"- Total wall time: {time.perf_counter() - started:.0f} s")
    dtypes = dtype_words(device, [MODELS[key] for key in args.models])
    header = [
        machine_line(device, dtypes),
        "",
        f"{load_at_start}; {load_line('at end')}",
        "",
        f"CPU start-up tuning (app.platform.cpu_runtime, as the app's): {tuning.describe()}",
    ]
    table = render(header, rows, footer)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    write_section(
        args.json,
        "lora_speed",
        device=str(device),
        machine=header[0],
        load=header[2],
        rows=rows,
        extra={"cpu_tuning": tuning.describe()},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
