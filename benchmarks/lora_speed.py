"""LoRA speed and memory: Plan 006's naive diffusers path against our harvest-and-fuse path.

Run with ``make bench`` or::

    .venv/bin/python -m benchmarks.lora_speed [--device auto|cpu|cuda] [--repeats N]
        [--models tiny,sd15] [--cache-dir PATH] [--output PATH] [--cycles N]
        [--cycle-budget-s S]

Two models, measured one after the other in the same process:

* ``tiny``: the app's embedded default model (``<cache>/models/embedded--tiny-sd``).
* ``sd15``: a pipeline with Stable Diffusion 1.5's real UNet, text-encoder and VAE configs and
  seeded random weights, built once into ``<cache>/models/bench--sd15-shaped`` (fp16 on disk,
  loaded as fp32 on the CPU and fp16 on CUDA). Nothing is downloaded.

For each model the test factory writes five rank-32 LoRAs for the UNet and the text encoder
(Kohya and PEFT files alternating) into a temporary folder; they are applied with weight 0.5.

Rows (median and spread over the repeats, by default 20 on the tiny model and 5 on the
SD 1.5-sized one; spread is p10–p90 with 10 or more samples, else min–max):

``naive: apply 5`` / ``naive: remove`` / ``naive: apply + remove``
    The baseline, ``PipelineManager`` with the LoRA cache disabled: ``load_loras`` (five
    ``load_lora_weights`` and one ``set_adapters``), then ``unload_loras``
    (``unload_lora_weights``).
``ours: cold``
    The fast path with an empty ``HarvestCache``: enter and exit ``loras_applied`` once, for LoRA
    files not seen before (each is harvested through diffusers, then the set is fused and the
    weights restored).
``ours: warm``
    The same set again, all five harvested: fuse on enter, restore on exit.
``ours: switch {1,2,3} <-> {3,4,5}``
    Alternating two harvested sets that share one LoRA; one sample is one set's enter + exit.
``floor``
    What no apply can beat: a ``clone`` of one flat tensor as large as the set's harvested
    factors (reading the LoRA bytes once) plus a ``copy_`` into tensors shaped like the weights
    the set touches (one pass over them).
``step: base`` / ``step: 5 fused (ours)`` / ``step: 5 unfused adapters (naive)``
    One UNet forward on a classifier-free-guidance batch of 2, the unit of the denoising loop
    (64x64 px; 512x512 px for the SD 1.5-sized model on CUDA): without LoRAs, inside
    ``loras_applied`` (fused) and with the five loaded as PEFT adapters by ``load_loras``. The
    notes check that fused and unfused agree and that the base output is bit-identical
    afterwards. On the CPU a step's time also depends on glibc's allocator state: in some
    processes every SD 1.5-sized step page-faults ~1.7 GiB of freshly mapped buffers again
    (~450k minor faults, +30-40 %), in others none, whatever the LoRAs; a fused/base gap that
    varies between runs is that, not the weights.
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
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import peft
import psutil
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from app.config import Settings
from app.cores.model_manager.embedded_model import (
    EMBEDDED_MODEL_FOLDER,
    _write_tokenizer,
    build_embedded_model,
)
from app.cores.model_manager.lora_fusion import HarvestCache, HarvestedLoRA, lora_components
from app.cores.model_manager.pipeline_manager import (
    AdapterSpec,
    DiffusionParams,
    PipelineManager,
)
from app.logging_setup import configure_logging
from tests.factories.lora_files import LoRAFileFormat, write_lora

MiB = 1024 * 1024
LORA_COUNT = 5
LORA_RANK = 32
LORA_WEIGHT = 0.5
CYCLE_PX = 64
MIN_CYCLES = 10

SD15_FOLDER = "bench--sd15-shaped"
# Bump when the architecture or seeds change, so that old folders are rebuilt.
SD15_VERSION = "1"
_SD15_VERSION_FILE = "bench_model_version.txt"


# ---------------------------------------------------------------------------------------------
# Models


def _sd15_pipeline(tokenizer_dir: Path) -> Any:
    """SD 1.5's UNet, text encoder and VAE configs with seeded random weights (fp32)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
            # The byte-level tokenizer's ids (< 514) are valid for this vocabulary.
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd15_model(model_dir: Path) -> float | None:
    """Build the SD 1.5-sized model into ``model_dir`` unless a current build is there.

    Returns the seconds the build took, or None if the folder was reused. Saved in fp16 (about
    2 GB); built in a scratch folder beside ``model_dir`` and renamed, so a crash leaves either
    no folder or a complete one.
    """
    marker = model_dir / _SD15_VERSION_FILE
    if marker.is_file() and marker.read_text().strip() == SD15_VERSION:
        return None
    started = time.perf_counter()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".build-") as scratch:
        tokenizer_dir = Path(scratch) / "tokenizer-source"
        _write_tokenizer(tokenizer_dir)
        build_dir = Path(scratch) / "model"
        pipeline = _sd15_pipeline(tokenizer_dir)
        pipeline.to(torch.float16)
        pipeline.save_pretrained(str(build_dir), safe_serialization=True)
        del pipeline
        (build_dir / _SD15_VERSION_FILE).write_text(SD15_VERSION + "\n")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        build_dir.rename(model_dir)
    return time.perf_counter() - started


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: where it lives, how to build it, and per-device sizes."""

    key: str
    label: str
    folder: str
    default_repeats: int
    step_px: dict[str, int]
    """Image size of the timed UNet step, per device type."""


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        "tiny", "tiny (embedded)", EMBEDDED_MODEL_FOLDER, 20, {"cpu": 64, "cuda": 64}
    ),
    "sd15": ModelSpec("sd15", "SD1.5-sized", SD15_FOLDER, 5, {"cpu": 64, "cuda": 512}),
}


def prepare_model(spec: ModelSpec, cache_dir: Path) -> tuple[Path, float | None]:
    """The model's folder, built if needed, and the build time (None if it was reused)."""
    model_dir = cache_dir / "models" / spec.folder
    if spec.key == "tiny":
        started = time.perf_counter()
        reused = (model_dir / "model_index.json").is_file()
        build_embedded_model(model_dir)
        return model_dir, None if reused else time.perf_counter() - started
    return model_dir, build_sd15_model(model_dir)


def new_lora_cache() -> HarvestCache:
    """A HarvestCache with the app's default limits."""
    fields = Settings.model_fields
    return HarvestCache(
        max_count=fields["lora_cache_max_count"].default,
        max_bytes=fields["lora_cache_max_bytes"].default,
    )


def load_manager(spec: ModelSpec, model_dir: Path, device: torch.device) -> PipelineManager:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return PipelineManager.load(
        spec.key,
        str(model_dir),
        device,
        dtype,
        progress=lambda _step, _phase, _message: None,
        should_stop=lambda: False,
        lora_cache=new_lora_cache(),
    )


def write_lora_set(pipeline: Any, folder: Path, model_key: str) -> list[AdapterSpec]:
    """Five rank-32 LoRAs for the UNet and the text encoder: Kohya, PEFT, Kohya, PEFT, Kohya."""
    specs = []
    for index in range(1, LORA_COUNT + 1):
        fmt: LoRAFileFormat = "kohya" if index % 2 else "peft"
        path = write_lora(
            folder / f"bench_{index}_{fmt}.safetensors",
            pipeline,
            fmt=fmt,
            components=("unet", "text_encoder"),
            rank=LORA_RANK,
            seed=index,
        )
        specs.append(
            AdapterSpec(
                adapter_name=f"bench_{index}",
                display_name=path.name,
                path=str(path),
                weight=LORA_WEIGHT,
                cache_key=f"{model_key}:{index}",
            )
        )
    return specs


def weight_bytes(pipeline: Any) -> int:
    """Bytes of the parameters and buffers of the UNet, text encoder and VAE."""
    total = 0
    for name in ("unet", "text_encoder", "vae"):
        module: torch.nn.Module = getattr(pipeline, name)
        for tensor in [*module.parameters(), *module.buffers()]:
            total += tensor.numel() * tensor.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# Measuring


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


@dataclass
class Bench:
    """One model's benchmark state and results."""

    spec: ModelSpec
    manager: PipelineManager
    adapters: list[AdapterSpec]
    clock: Clock
    repeats: int
    rows: list[Row] = field(default_factory=list)
    medians: dict[str, float] = field(default_factory=dict)
    floor_notes: str = ""

    @property
    def device(self) -> torch.device:
        return self.clock.device

    def timing(self, key: str, name: str, samples: Sequence[float], notes: str = "") -> float:
        median = statistics.median(samples)
        low, high, kind = spread(samples)
        self.medians[key] = median
        self.rows.append(
            Row(
                self.spec.label,
                name,
                f"{median:.1f} ms",
                f"{low:.1f}–{high:.1f} ({kind}, n={len(samples)})",
                notes,
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


# ---------------------------------------------------------------------------------------------
# Rows


def bench_apply_remove(bench: Bench) -> None:
    """Naive, cold, warm, switch and floor rows, interleaved round by round.

    The machine is shared and its load drifts: measuring every variant in each round keeps
    the comparison fair. Round 0 is a warm-up and is not recorded.
    """
    manager, adapters, clock = bench.manager, bench.adapters, bench.clock
    sets = [adapters[0:3], adapters[2:5]]
    samples: dict[str, list[float]] = {}
    floor: Callable[[], None] | None = None
    for round_index in range(bench.repeats + 1):
        measured: dict[str, float] = {}
        gc.collect()
        measured["naive_apply"] = clock.ms(lambda: manager.load_loras(adapters))
        measured["naive_remove"] = clock.ms(manager.unload_loras)
        manager.lora_cache = new_lora_cache()
        gc.collect()
        measured["cold_enter"], measured["cold_exit"] = clock.enter_exit_ms(
            manager.loras_applied(adapters)
        )
        gc.collect()
        measured["warm_enter"], measured["warm_exit"] = clock.enter_exit_ms(
            manager.loras_applied(adapters)
        )
        for index, chosen in enumerate(sets):
            gc.collect()
            entered, exited = clock.enter_exit_ms(manager.loras_applied(chosen))
            measured[f"switch_{index}"] = entered + exited
        if floor is None:
            floor = floor_pass(bench)
        measured["floor"] = clock.ms(floor)
        if round_index > 0:
            for key, value in measured.items():
                samples.setdefault(key, []).append(value)
    report_apply_remove(bench, samples)


def _sum(*series: list[float]) -> list[float]:
    return [sum(values) for values in zip(*series, strict=True)]


def report_apply_remove(bench: Bench, samples: dict[str, list[float]]) -> None:
    median = statistics.median
    bench.timing(
        "naive_apply",
        "naive: apply 5 (load_lora_weights x5 + set_adapters)",
        samples["naive_apply"],
    )
    bench.timing("naive_remove", "naive: remove (unload_lora_weights)", samples["naive_remove"])
    bench.timing(
        "naive",
        "naive: apply + remove (baseline)",
        _sum(samples["naive_apply"], samples["naive_remove"]),
    )
    bench.timing(
        "cold",
        "ours: cold, first use of the set (harvest 5 + fuse + restore)",
        _sum(samples["cold_enter"], samples["cold_exit"]),
        f"enter {median(samples['cold_enter']):.1f} / exit {median(samples['cold_exit']):.1f} ms",
    )
    bench.timing(
        "warm",
        "ours: warm, set seen before (fuse 5 + restore)",
        _sum(samples["warm_enter"], samples["warm_exit"]),
        f"enter (fuse) {median(samples['warm_enter']):.1f} / exit (restore) "
        f"{median(samples['warm_exit']):.1f} ms",
    )
    bench.timing(
        "switch",
        "ours: switch {1,2,3} <-> {3,4,5} (harvested)",
        samples["switch_0"] + samples["switch_1"],
        f"one sample = one set's enter + exit; {{1,2,3}} {median(samples['switch_0']):.1f} / "
        f"{{3,4,5}} {median(samples['switch_1']):.1f} ms",
    )
    bench.timing(
        "floor",
        "floor: read the set's LoRA bytes once + one pass over touched weights",
        samples["floor"],
        bench.floor_notes,
    )


def harvested_set(bench: Bench) -> list[HarvestedLoRA]:
    entries = [bench.manager.lora_cache.get(a.cache_key) for a in bench.adapters]
    found = [entry for entry in entries if entry is not None]
    assert len(found) == len(entries), "run cold first"
    return found


def touched_weights(
    pipeline: Any, entries: Sequence[HarvestedLoRA]
) -> dict[tuple[str, str], torch.Tensor]:
    """The weight tensors the LoRAs change, each once, by (component, module name)."""
    components = lora_components(pipeline)
    weights = {}
    for component, module_name in sorted({key for entry in entries for key in entry.layers}):
        weight = components[component].get_submodule(module_name).weight
        assert isinstance(weight, torch.Tensor)
        weights[(component, module_name)] = weight.detach()
    return weights


def delta_gflop(
    entries: Sequence[HarvestedLoRA], weights: dict[tuple[str, str], torch.Tensor]
) -> float:
    """Multiply-adds of the fused deltas (out x sum of ranks x in per layer), in GFLOP."""
    total = 0
    for key, weight in weights.items():
        ranks = sum(entry.layers[key].down.shape[0] for entry in entries if key in entry.layers)
        total += 2 * weight.numel() * ranks
    return total / 1e9


def floor_pass(bench: Bench) -> Callable[[], None]:
    """clone of the set's LoRA bytes + copy_ over tensors shaped like the touched weights."""
    entries = harvested_set(bench)
    touched = touched_weights(bench.manager.pipeline, entries)
    weights = list(touched.values())
    lora_bytes = sum(entry.nbytes for entry in entries)
    dtype = weights[0].dtype
    element = torch.empty((), dtype=dtype).element_size()
    flat = torch.randn(lora_bytes // element, device=bench.device).to(dtype)
    copies = [torch.empty_like(weight) for weight in weights]
    touched_bytes = sum(weight.numel() * weight.element_size() for weight in weights)
    bench.floor_notes = (
        f"LoRA factors {lora_bytes / MiB:.1f} MiB; {len(weights)} touched tensors "
        f"{touched_bytes / MiB:.1f} MiB; fusing also needs {delta_gflop(entries, touched):.3g} "
        "GFLOP of matmuls, not in the floor"
    )

    def one_pass() -> None:
        flat.clone()
        with torch.no_grad():
            for target, weight in zip(copies, weights, strict=True):
                target.copy_(weight)

    return one_pass


def make_unet_step(bench: Bench, px: int) -> Callable[[], torch.Tensor]:
    """One UNet forward on a CFG batch of 2 at ``px`` x ``px`` pixels, fixed inputs."""
    pipeline = bench.manager.pipeline
    unet = pipeline.unet
    side = px // pipeline.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, side, side, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    latents = latents.to(bench.device, unet.dtype)
    context = context.to(bench.device, unet.dtype)
    timestep = torch.tensor(500, device=bench.device)

    def step() -> torch.Tensor:
        with torch.no_grad():
            output: torch.Tensor = unet(latents, timestep, encoder_hidden_states=context)[0]
        return output

    return step


def bench_steps(bench: Bench) -> None:
    """Per-step cost: base, five LoRAs fused (ours), five unfused PEFT adapters (naive).

    Interleaved round by round like the apply rows; round 0 is a warm-up. Each variant runs
    two steps in a row: the second is the row (the steady cost of a step in the denoising
    loop); the first, right after the weights or modules changed, is in the notes.
    """
    manager = bench.manager
    px = bench.spec.step_px[bench.device.type]
    step = make_unet_step(bench, px)
    samples: dict[str, list[float]] = {}
    outputs: dict[str, torch.Tensor] = {}

    def two_steps(key: str, round_index: int) -> None:
        for position in ("first", "steady"):
            start = bench.clock.now()
            outputs[key] = step()
            elapsed = bench.clock.now() - start
            if round_index > 0:
                samples.setdefault(f"{key}_{position}", []).append(elapsed)

    # No gc.collect() here: the step right after one is measurably slower on the tiny model.
    for round_index in range(bench.repeats + 1):
        two_steps("base", round_index)
        with manager.loras_applied(bench.adapters):
            two_steps("fused", round_index)
        manager.load_loras(bench.adapters)
        try:
            two_steps("unfused", round_index)
        finally:
            manager.unload_loras()
    base_before = outputs["base"]
    base_after = step()
    fused_out, unfused_out = outputs["fused"].float(), outputs["unfused"].float()
    difference = (fused_out - unfused_out).abs().max().item()
    lora_effect = (unfused_out - base_before.float()).abs().max().item()

    def first(key: str) -> str:
        return f"first step after the change {statistics.median(samples[f'{key}_first']):.1f} ms"

    bench.timing(
        "step_base",
        "step: base UNet",
        samples["base_steady"],
        f"{px}x{px} px, batch 2 (CFG); {first('base')}",
    )
    bench.timing(
        "step_fused",
        "step: 5 LoRAs fused (ours)",
        samples["fused_steady"],
        f"{first('fused')}; max |fused − unfused| {difference:.2g} "
        f"(max LoRA effect {lora_effect:.3g})",
    )
    bench.timing(
        "step_unfused",
        "step: 5 unfused PEFT adapters (naive)",
        samples["unfused_steady"],
        first("unfused"),
    )
    restored = torch.equal(base_after, base_before)
    bench.note(
        "check: base output after all rows",
        "identical" if restored else "DIFFERS",
        "bit-identical to before" if restored else "base weights not restored exactly",
    )


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


def _generate_cycle(manager: PipelineManager, adapters: list[AdapterSpec]) -> None:
    """Apply, generate one 1-step 64x64 image with CFG, remove."""
    params = DiffusionParams(
        prompt="a lighthouse on a cliff at sunset",
        negative_prompt="blurry",
        steps=1,
        cfg_scale=7.0,
        clip_skip=1,
        seeds=[0],
        scheduler=EulerDiscreteScheduler.from_config(manager.scheduler_config),
    )
    with manager.loras_applied(adapters):
        manager.text_to_image(params, CYCLE_PX, CYCLE_PX, None)


def bench_memory(bench: Bench, max_cycles: int, budget_s: float) -> None:
    """RSS (and CUDA peak) growth between the first and the last of N cycles.

    N is ``max_cycles`` unless the cycles after the first take longer than ``budget_s``
    together; then as many as fit (at least ``MIN_CYCLES``).
    """
    manager, clock = bench.manager, bench.clock
    cuda = bench.device.type == "cuda"
    times = [clock.ms(lambda: _generate_cycle(manager, bench.adapters))]
    gc.collect()
    rss_first = rss_bytes()
    trimmed_first = trimmed_rss_bytes()
    peak_first = torch.cuda.max_memory_allocated(bench.device) if cuda else 0
    deadline = time.perf_counter() + budget_s
    while len(times) < max_cycles and (len(times) < MIN_CYCLES or time.perf_counter() < deadline):
        times.append(clock.ms(lambda: _generate_cycle(manager, bench.adapters)))
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
        f"{cycles} cycles{fewer}",
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
        f"- {label}: against naive apply + remove ({m['naive']:.1f} ms), warm switching is "
        f"{speedup(m['naive'], m['warm'])} ({m['warm']:.1f} ms), switching {{1,2,3}} <-> "
        f"{{3,4,5}} {speedup(m['naive'], m['switch'])} ({m['switch']:.1f} ms), cold "
        f"{speedup(m['naive'], m['cold'])} ({m['cold']:.1f} ms); warm is "
        f"{m['warm'] / m['floor']:.1f}x the floor.",
        f"- {label}: per step, 5 fused {100 * (m['step_fused'] / m['step_base'] - 1):+.1f} % vs "
        f"base ({m['step_fused']:.1f} vs {m['step_base']:.1f} ms); 5 unfused adapters "
        f"{100 * (m['step_unfused'] / m['step_base'] - 1):+.1f} % ({m['step_unfused']:.1f} ms).",
    ]


def machine_line(device: torch.device) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    where = f"{device.type}, fp32"
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)}), fp16"
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    omp = os.environ.get("OMP_WAIT_POLICY", "default")
    return (
        f"Machine: {cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads, "
        f"OMP_WAIT_POLICY {omp}), torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}; device {where}; {date}"
    )


def load_line(label: str) -> str:
    """The machine's load average: other work on a shared machine inflates every timing."""
    one, five, fifteen = os.getloadavg()
    return f"load average {label}: {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


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
        adapters = write_lora_set(manager.pipeline, Path(folder), spec.key)
        bench = Bench(spec, manager, adapters, Clock(device), repeats)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("apply/remove rounds", lambda: bench_apply_remove(bench)),
            ("step rounds", lambda: bench_steps(bench)),
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
        "--repeats", type=int, default=None, help="samples per row (default: tiny 20, sd15 5)"
    )
    parser.add_argument("--models", default="tiny,sd15", help="comma-separated: tiny, sd15")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("LOCALAI_CACHE_DIR", ".cache")),
        help="models are built under <cache>/models (default: $LOCALAI_CACHE_DIR or .cache)",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    parser.add_argument("--cycles", type=int, default=100, help="apply/generate/remove cycles")
    parser.add_argument(
        "--cycle-budget-s",
        type=float,
        default=180.0,
        help="run fewer cycles when they would take longer than this (seconds per model)",
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
        if key == "sd15":
            footer.append(
                "- SD1.5-sized model build: "
                + (f"{built_s:.0f} s (this run)" if built_s is not None else "reused from cache")
            )
        gc.collect()
    footer.append(f"- Total wall time: {time.perf_counter() - started:.0f} s")
    header = [machine_line(device), "", f"{load_at_start}; {load_line('at end')}"]
    table = render(header, rows, footer)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
