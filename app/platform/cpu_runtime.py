"""Start-up settings that keep a CPU's denoising steps steady: glibc's allocator (issue 16,
"CPU users"). Two behaviours were measured; one is handled, where it is safe and never over
the user's choice, the other is left alone:

* **glibc hands oneDNN's per-step buffers back to the OS, and they fault in again.** A
  512x512 SD1.5 UNet step in fp32 allocates and frees about 42 buffers of 40-118 MiB each
  (convolution weights reordered into oneDNN's layout on every call, large activations):
  2.7 GiB per step. glibc serves every request above 32 MiB (the largest possible
  ``M_MMAP_THRESHOLD``, so that setting cannot help) with its own ``mmap`` and ``munmap``s it
  on ``free`` (strace: 42 ``mmap`` + 168 ``munmap`` per step), and trims the heap's top once
  more than 128 KiB (at most 64 MiB as its dynamic threshold rises) is free there. Every step
  faults those pages in again: 500-890 k minor faults per step measured, CPU time in the
  kernel zeroing pages. Three settings (:data:`ALLOCATOR_SETTINGS`) take it to under 200
  faults per step from the second step on: ``M_MMAP_MAX = 0`` (large buffers from the heap),
  ``M_TRIM_THRESHOLD`` at its maximum (the heap's top stays; without it ``brk`` shrank and
  grew the heap some 290 times per step and 220 k-1.1 M faults per step stayed) and
  ``M_ARENA_MAX = 1`` (the app steps in a worker thread, whose own arena glibc unmaps anyway).
  The faults' cost is per call, not per pixel: a 256x256 step went from 2.95-3.51 s to
  2.29-2.50 s (-21 %, CPU -17 %, two alternating rounds, quiet machine); at 512x512 it is a
  few per cent, inside this shared machine's noise (medians -10 % and +14 % in two quiet runs).
  The memory then stays with the process, as with jemalloc or tcmalloc:
  :func:`release_free_memory` gives it back when a model is unloaded
  (``PipelineManager.close``).
  Applied only when the CPU computes (on a GPU the host allocator does not pace the steps,
  and keeping freed host memory there would only raise the RSS after a load), only on Linux
  with glibc, and not when the user chose allocator settings (any ``MALLOC_*`` variable,
  ``glibc.malloc`` tunables, or another allocator in ``LD_PRELOAD``).

* **OpenMP's wait policy is left at libgomp's default** (spin, then sleep), after measuring
  the alternatives on the SD1.5 512x512 step and the tiny embedded model (2 shared cores):
  ``OMP_WAIT_POLICY=PASSIVE`` made the tiny model's quiet 64 px step 32-48 % slower (8.6-9.5 ->
  12.2-13.2 ms, many short parallel regions, each waking a sleeping thread) and
  ``GOMP_SPINCOUNT=1000`` 8 % slower; on the SD1.5 step neither was faster, under contention
  either (one busy competitor: default 12.1-16.7 s, passive 19.8-22.2 s per step; two:
  default 15.2-18.7 s, ``GOMP_SPINCOUNT=1000`` 28.7-30.8 s; other load drifting meanwhile).
  Their only gain was CPU time while other OpenMP programs ran (load 6-8: 19-25 CPU seconds
  per step with the default, 14.5-16 passive), which other processes get, not the step. A
  user who wants that sets ``OMP_WAIT_POLICY=PASSIVE`` before starting the app.

``LOCALAI_CPU_TUNING=false`` turns it off. This module does not import torch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# glibc's <malloc.h> parameter numbers for mallopt(3).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

ALLOCATOR_SETTINGS: tuple[tuple[str, int, int], ...] = (
    # No allocation is served by its own mmap, so none is munmapped (and faulted in again).
    ("M_MMAP_MAX", M_MMAP_MAX, 0),
    # The heap's top is given back only when more than this is free there. mallopt takes an
    # int: 2 GiB - 1 is the largest.
    ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, _INT_MAX),
    # The app steps in a worker thread; a thread's own arena lives in mmapped heaps of at
    # most 64 MiB that glibc unmaps once they are free, whatever the settings above: measured
    # in a worker thread, 290-300 k faults per step remained with the two settings above,
    # 3 with all threads in the main arena (and the step was no slower: one malloc lock for
    # all threads costs nothing next to a step's large allocations).
    ("M_ARENA_MAX", M_ARENA_MAX, 1),
)

_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass
class CpuTuning:
    """What the start-up did, and why it left something alone, for the log."""

    allocator: dict[str, int] = field(default_factory=dict)
    """mallopt parameter name -> value, for the calls that glibc accepted."""
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """In words, for a benchmark's header."""
        parts = []
        if self.allocator:
            parts.append(
                "glibc mallopt " + ", ".join(f"{k}={v}" for k, v in self.allocator.items())
            )
        return "; ".join([*parts, *self.skipped]) or "nothing to do"

    def log(self) -> None:
        if self.allocator:
            settings = ", ".join(f"{key}={value}" for key, value in self.allocator.items())
            logger.info("CPU tuning: glibc mallopt %s", settings)
        for reason in self.skipped:
            logger.info("CPU tuning: %s", reason)


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such function)
        mallopt = libc.mallopt
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return libc


def _user_allocator_choice(env: MutableMapping[str, str]) -> str | None:
    for name in env:
        if name.startswith("MALLOC_"):
            return name
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = env.get("LD_PRELOAD", "")
    if any(allocator in preload for allocator in _OTHER_ALLOCATORS):
        return "LD_PRELOAD"
    return None


def configure_allocator(tuning: CpuTuning, environ: MutableMapping[str, str] | None = None) -> None:
    """Keep glibc from returning (and re-faulting) large buffers on every step."""
    env = os.environ if environ is None else environ
    user_choice = _user_allocator_choice(env)
    if user_choice is not None:
        tuning.skipped.append(f"glibc allocator left as set by the user ({user_choice})")
        return
    libc = _glibc()
    if libc is None:
        tuning.skipped.append("allocator not tuned: not Linux with glibc")
        return
    for name, parameter, value in ALLOCATOR_SETTINGS:
        if libc.mallopt(parameter, value) == 1:
            tuning.allocator[name] = value
        else:
            tuning.skipped.append(f"glibc refused mallopt {name}={value}")


def release_free_memory() -> bool:
    """Give the allocator's free memory back to the OS (glibc's ``malloc_trim(0)``): with
    :func:`configure_allocator`'s settings glibc keeps it otherwise. False without glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def cpu_computes(device_setting: str) -> bool:
    """Whether models load on the CPU by default: ``LOCALAI_DEVICE`` is ``cpu``, or ``auto`` on
    a machine without CUDA or MPS (that check imports torch)."""
    if device_setting != "auto":
        return device_setting == "cpu"
    from app.cores.model_manager.device import auto_device

    return auto_device().type == "cpu"


def tune_at_start_up(enabled: bool, device_setting: str) -> CpuTuning:
    """What ``python -m app`` does first, before the app's modules are imported: if the CPU
    computes, glibc's allocator settings. ``enabled`` is ``LOCALAI_CPU_TUNING``,
    ``device_setting`` is ``LOCALAI_DEVICE``. Returns what was set, for :meth:`CpuTuning.log`
    once logging is configured."""
    tuning = CpuTuning()
    if not enabled:
        tuning.skipped.append("turned off (LOCALAI_CPU_TUNING=false)")
        return tuning
    if cpu_computes(device_setting):
        configure_allocator(tuning)
    else:
        tuning.skipped.append("allocator left as it is: a GPU computes the steps")
    return tuning
