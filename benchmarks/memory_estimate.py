"""The memory estimate against measured peaks: is a generation's estimate at least its real peak?

Run with ``make bench`` (after :mod:`benchmarks.lora_speed`) or::

    .venv/bin/python -m benchmarks.memory_estimate [--device auto|cpu|cuda] [--steps N]
        [--repeats N] [--cases 512x512x1,1024x1024x2] [--cache-dir PATH] [--output PATH]

The app refuses, with a 400, a generation whose estimated working memory
(:mod:`app.cores.model_manager.memory`) exceeds the user's share of the device. An estimate
below the real peak lets through requests that do not fit; a large over-estimate refuses
requests that would. For the embedded tiny model and a few sizes (by default 512x512 x1 and
x4, 1024x1024 x1 and x2, 2 steps) this prints the estimate, the measured peak and their ratio.

Each case runs the app's own path: the model is loaded by ``PipelineManager.load`` (VAE
slicing on, as the app loads it), the request is a ``GenerationPlan`` from a
``GeneratorConfig`` with the UI's defaults (Euler a, CFG 7.5, the default negative prompt,
step previews on) and the user's default memory shares; the estimate is what
``check_memory`` computes for it (so also whether it would decode in tiles), and the measured
call is ``run_generation`` (the same check, the denoising loop with its previews, the VAE
decode and the conversion to PIL images).

What is measured, per case, in a fresh subprocess (so that no earlier case leaves freed but
resident memory, or a warm CUDA cache, behind), after the model is loaded and one 64x64
one-step generation has run (one-off lazy set-up, e.g. kernels and thread pools, is not
per-request memory). The call runs ``--repeats`` times (default 3) and the largest peak
counts: on the CPU the same call's peak varies by around 100 MiB from run to run, and more
from process to process (glibc's per-thread arenas, oneDNN's buffers); the estimate must
cover the worst of them, so a margin of less than ~100 MiB on the CPU is no margin.

* CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus
  ``torch.cuda.memory_allocated()`` just before it (peak stats reset, cache emptied). It
  counts tensors of PyTorch's caching allocator only: not the CUDA context, not libraries'
  memory outside that allocator, and not the cache's fragmentation; the notes give the
  growth of ``max_memory_reserved()`` (what the process took from the GPU) beside it.
* CPU: the growth of the process's resident set size (RSS) over the call, from the RSS just
  before it (after ``gc.collect()`` and glibc's ``malloc_trim``, so that freed heap pages
  are not silently reused) to the kernel's peak RSS during it: on Linux ``VmHWM`` of
  ``/proc/self/status``, reset to the current RSS just before the call by writing ``5`` to
  ``/proc/self/clear_refs``; no short peak is missed. Elsewhere, or where that file cannot be
  written, RSS is sampled with psutil every 2 ms in a background thread (a peak shorter than
  that may be missed); on Linux the sampled peak is shown in the notes as a cross-check.
  Limits: RSS counts pages touched, so memory allocated but never written is not counted
  (it takes no RAM either); pages the allocator still holds from before the call and reuses
  are not counted as growth (hence the fresh process and ``malloc_trim``); and everything
  else the process does meanwhile (Python objects, library code paged in) is counted.

The table marks a case whose estimate is below the measured peak ``NO``: the factors in
:mod:`app.cores.model_manager.memory` must then grow. The command then exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import psutil
import socketio
import torch

from app.cores.model_manager.memory import MemoryShares
from app.cores.model_manager.pipeline_manager import PipelineManager
from app.features.config.schemas import UserConfig
from app.features.generators.runner import GenerationPlan, check_memory, run_generation
from app.features.generators.schemas import GeneratorConfig
from app.logging_setup import configure_logging
from app.platform.events import EventEmitter
from benchmarks.measure import MiB, progress
from benchmarks.models import MODELS, load_manager, prepare_model
from benchmarks.peak_memory import peak_on_cpu, peak_on_cuda

DEFAULT_CASES = "512x512x1,512x512x4,1024x1024x1,1024x1024x2"
DEFAULT_STEPS = 2
DEFAULT_REPEATS = 3
WARM_UP_PX = 64
CASE_TIMEOUT_S = 1800
PROMPT = "a lighthouse on a cliff at sunset"


@dataclass(frozen=True)
class Case:
    width: int
    height: int
    images: int

    @classmethod
    def parse(cls, text: str) -> Case:
        try:
            width, height, images = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected WIDTHxHEIGHTxIMAGES, e.g. 512x512x4"
            ) from None
        return cls(width, height, images)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.images}"


@dataclass(frozen=True)
class Result:
    """One case's figures, as the subprocess reports them (bytes)."""

    case: str
    estimate: int
    tiled_decode: bool
    measured: int
    notes: str

    @property
    def covered(self) -> bool:
        return self.estimate >= self.measured


# ---------------------------------------------------------------------------------------------
# Measuring one call (in the subprocess)


def _plan(case: Case, steps: int) -> GenerationPlan:
    """The request the UI would send for ``case``, with the user's default memory shares."""
    defaults = UserConfig()
    config = GeneratorConfig(
        prompt=PROMPT,
        width=case.width,
        height=case.height,
        number_of_images=case.images,
        steps=steps,
    )
    return GenerationPlan(
        config=config,
        seeds=list(range(case.images)),
        memory=MemoryShares(gpu=defaults.gpu_scale_factor, ram=defaults.ram_scale_factor),
    )


def measure_case(
    case: Case, steps: int, repeats: int, cache_dir: Path, device: torch.device
) -> Result:
    spec = MODELS["tiny"]
    model_dir, _ = prepare_model(spec, cache_dir)
    manager: PipelineManager = load_manager(spec, model_dir, device)
    # Not started: emit only calls the listeners (none); the previews are still made.
    events = EventEmitter(socketio.AsyncServer(async_mode="asgi"))
    run_generation(manager, _plan(Case(WARM_UP_PX, WARM_UP_PX, 1), 1), events)
    plan = _plan(case, steps)
    memory = check_memory(manager, plan)  # raises MemoryLimitError beyond the share

    def work() -> None:
        run_generation(manager, plan, events)

    runs = [
        peak_on_cuda(work, device) if device.type == "cuda" else peak_on_cpu(work)
        for _ in range(repeats)
    ]
    measured, notes = max(runs)
    if repeats > 1:
        low = min(peak for peak, _ in runs)
        notes = f"max of {repeats} runs ({low / MiB:.0f}–{measured / MiB:.0f} MiB); {notes}"
    return Result(str(case), memory.estimate, memory.tiled_decode, measured, notes)


# ---------------------------------------------------------------------------------------------
# Orchestration and the table (in the parent)


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> Result:
    command = [
        sys.executable,
        "-m",
        "benchmarks.memory_estimate",
        "--case",
        str(case),
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--device",
        device.type,
        "--cache-dir",
        str(args.cache_dir),
    ]
    done = subprocess.run(
        command, stdout=subprocess.PIPE, text=True, timeout=CASE_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed (exit status {done.returncode})")
    fields: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return Result(**fields)


def render(header: Sequence[str], results: Sequence[Result], steps: int, repeats: int) -> str:
    lines = [
        "# Memory estimate against measured peak working memory",
        "",
        *header,
        "",
        "| size | images | decode | estimate MiB | measured peak MiB | estimate/measured "
        "| estimate >= measured | notes |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        case = Case.parse(r.case)
        ratio = f"{r.estimate / r.measured:.2f}" if r.measured > 0 else "—"
        lines.append(
            f"| {case.width}x{case.height} | {case.images} "
            f"| {'tiled' if r.tiled_decode else 'whole'} | {r.estimate / MiB:.0f} "
            f"| {r.measured / MiB:.0f} | {ratio} | {'yes' if r.covered else 'NO'} | {r.notes} |"
        )
    under = [r.case for r in results if not r.covered]
    verdict = (
        f"UNDER-ESTIMATED: {', '.join(under)} (the estimate is below the measured peak)"
        if under
        else "No case is under-estimated."
    )
    runs = f"{steps} steps per run, the largest peak of {repeats} runs per case"
    return "\n".join([*lines, "", f"{runs}. {verdict}", ""])


def machine_line(device: torch.device) -> str:
    where = f"{device.type}, fp32"
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)}), fp16"
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    one, five, fifteen = os.getloadavg()
    return (
        f"Model: tiny (embedded); device {where}; {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 1024**3:.1f} GiB RAM; torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}; load average {one:.2f} / {five:.2f} / "
        f"{fifteen:.2f}; {date}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"runs per case; the largest peak counts (default {DEFAULT_REPEATS})",
    )
    parser.add_argument(
        "--cases",
        default=DEFAULT_CASES,
        help=f"comma-separated WIDTHxHEIGHTxIMAGES (default {DEFAULT_CASES})",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("LOCALAI_CACHE_DIR", ".cache")),
        help="the model is built under <cache>/models (default: $LOCALAI_CACHE_DIR or .cache)",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    # One case, measured in this process: how the parent runs each case.
    parser.add_argument("--case", type=Case.parse, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats: at least 1")
    try:
        args.cases = [Case.parse(text.strip()) for text in args.cases.split(",") if text.strip()]
    except argparse.ArgumentTypeError as error:
        parser.error(f"--cases: {error}")
    if not args.cases:
        parser.error("--cases: at least one")
    return args


def quiet_libraries() -> None:
    """The benchmark's stdout is the table (the subprocess's, one JSON line)."""
    configure_logging("WARNING")
    diffusers.utils.logging.disable_progress_bar()
    for category in (DeprecationWarning, FutureWarning, UserWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.case is not None:
        result = measure_case(args.case, args.steps, args.repeats, args.cache_dir, device)
        print(json.dumps(result.__dict__), flush=True)
        return 0
    started = time.perf_counter()
    prepare_model(MODELS["tiny"], args.cache_dir)  # built once, before the cases
    results = []
    for case in args.cases:
        progress(f"memory estimate: {case} (fresh process)")
        results.append(run_case(case, args, device))
    header = [machine_line(device)]
    table = render(header, results, args.steps, args.repeats)
    table += f"Total wall time: {time.perf_counter() - started:.0f} s\n"
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    return 0 if all(r.covered for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
