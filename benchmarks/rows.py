"""The measured rows: apply/remove and per-step cost (memory rows: :mod:`benchmarks.memory_rows`).

Each ``bench_*`` function runs its variants interleaved round by round (round 0 is a warm-up)
and records its rows in the model's :class:`~benchmarks.measure.Bench`; what each row means is
described in :mod:`benchmarks.lora_speed`.
"""

from __future__ import annotations

import gc
import resource
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from app.cores.lora_engine import LoRACache, LoRAEngine, LoRARequest
from app.cores.lora_engine.preparation import PreparedLoRA
from benchmarks.floor import Floor, FloorSample
from benchmarks.measure import Bench

_NAIVE_COMPONENTS = ("unet", "text_encoder")


def naive_load(
    pipeline: Any,
    requests: Sequence[LoRARequest],
    components: Sequence[str] = _NAIVE_COMPONENTS,
) -> None:
    """Plan 006: each LoRA loaded by diffusers as its own PEFT adapter, then all activated
    with their weights on ``components`` (what the engine does with the cache disabled, after
    preparing)."""
    names = [f"bench_{request.id}" for request in requests]
    for name, request in zip(names, requests, strict=True):
        pipeline.load_lora_weights(str(request.path), adapter_name=name, use_safetensors=True)
    pipeline.set_adapters(
        names,
        adapter_weights=[{c: r.weight_for(c) for c in components} for r in requests],
    )


def naive_unload(pipeline: Any) -> None:
    """Plan 006: remove every adapter; the modules are the base model's own again."""
    pipeline.unload_lora_weights()


def bench_apply_remove(bench: Bench) -> None:
    """Naive, app-with-cache-off, cold, warm, switch and floor rows, round by round.

    The machine is shared and its load drifts: measuring every variant in each round keeps
    the comparison fair. Round 0 is a warm-up and is not recorded.
    """
    manager, requests, clock = bench.manager, bench.requests, bench.clock
    pipeline = manager.pipeline
    cache_off = LoRAEngine(pipeline, manager.family, bench.device, LoRACache(0, 0))
    sets = [requests[0:3], requests[2:5]]
    # The same five at other weights: the engine fuses the whole set again.
    reweighted = [replace(r, weight=r.weight * 1.2) for r in requests]
    samples: dict[str, list[float]] = {}
    floor: Floor | None = None
    floor_samples: list[FloorSample] = []
    for round_index in range(bench.repeats + 1):
        measured: dict[str, float] = {}
        gc.collect()
        measured["naive_apply"] = clock.ms(
            lambda: naive_load(pipeline, requests, bench.spec.lora_components)
        )
        measured["naive_remove"] = clock.ms(lambda: naive_unload(pipeline))
        gc.collect()
        measured["off_enter"], measured["off_exit"] = clock.enter_exit_ms(
            cache_off.applied(requests)
        )
        manager.loras.cache.clear()
        gc.collect()
        measured["cold_enter"], measured["cold_exit"] = clock.enter_exit_ms(
            manager.apply_loras(requests)
        )
        gc.collect()
        measured["warm_enter"], measured["warm_exit"] = clock.enter_exit_ms(
            manager.apply_loras(requests)
        )
        gc.collect()
        measured["reweight_enter"], measured["reweight_exit"] = clock.enter_exit_ms(
            manager.apply_loras(reweighted)
        )
        for index, chosen in enumerate(sets):
            gc.collect()
            entered, exited = clock.enter_exit_ms(manager.apply_loras(chosen))
            measured[f"switch_{index}"] = entered + exited
        if floor is None:
            floor = Floor(pipeline, prepared_set(bench), bench.device)
        if round_index > 0:
            floor_samples.append(floor.measure())
        if round_index > 0:
            for key, value in measured.items():
                samples.setdefault(key, []).append(value)
    report_apply_remove(bench, samples)
    assert floor is not None
    best = floor.at_best_rates(floor_samples)
    bench.medians["floor"] = best.floor_ms
    bench.note(
        "floor: max(memory traffic, fusion FLOPs), at the best rates measured in this run",
        f"{best.floor_ms:.1f} ms",
        floor.describe(best),
    )
    bench.timing(
        "bandwidth",
        "machine: memory bandwidth (256 MiB copy_, read + write, best of 3 per round)",
        [s.bandwidth_gbs for s in floor_samples],
        unit="GB/s",
    )
    bench.timing(
        "matmul_rate",
        f"machine: matmul rate ({floor.dtype} square mm, best of 3 per round)".replace(
            "torch.", ""
        ),
        [s.matmul_gflops for s in floor_samples],
        unit="GFLOP/s",
    )


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
        "cache_off",
        "app, cache off: apply + remove (prepare 5 + naive)",
        _sum(samples["off_enter"], samples["off_exit"]),
        f"LOCALAI_LORA_CACHE_MAX_COUNT=0: each file read and mapped, then Plan 006; enter "
        f"{median(samples['off_enter']):.1f} / exit {median(samples['off_exit']):.1f} ms",
    )
    bench.timing(
        "cold",
        "ours: cold, first use of the set (prepare 5 + fuse + restore)",
        _sum(samples["cold_enter"], samples["cold_exit"]),
        f"enter {median(samples['cold_enter']):.1f} / exit {median(samples['cold_exit']):.1f} ms",
    )
    swapped = bench.manager.loras.backups.swap
    bench.timing(
        "warm",
        "ours: warm, the same set again (apply + restore)",
        _sum(samples["warm_enter"], samples["warm_exit"]),
        f"enter {median(samples['warm_enter']):.1f} / exit {median(samples['warm_exit']):.1f} ms; "
        + (
            "the buffers still hold this set's fused weights: swapped back in, nothing computed"
            if swapped
            else "fused again (GPU or offloaded weights: copies in host memory)"
        ),
    )
    bench.timing(
        "reweight",
        "ours: warm, all 5 at other weights (fuse 5 + restore)",
        _sum(samples["reweight_enter"], samples["reweight_exit"]),
        f"enter (fuse) {median(samples['reweight_enter']):.1f} / exit (restore) "
        f"{median(samples['reweight_exit']):.1f} ms; weights x1.2: the whole set is fused again",
    )
    bench.timing(
        "switch",
        "ours: switch {1,2,3} <-> {3,4,5} (prepared)",
        samples["switch_0"] + samples["switch_1"],
        f"one sample = one set's enter + exit; {{1,2,3}} {median(samples['switch_0']):.1f} / "
        f"{{3,4,5}} {median(samples['switch_1']):.1f} ms",
    )


def prepared_set(bench: Bench) -> list[PreparedLoRA]:
    entries = [bench.manager.loras.cache.get(r.content_key) for r in bench.requests]
    found = [entry for entry in entries if entry is not None]
    assert len(found) == len(entries), "run cold first"
    return found


def make_unet_step(bench: Bench, px: int) -> Callable[[], torch.Tensor]:
    """One UNet forward on a CFG batch of 2 at ``px`` x ``px`` pixels, fixed inputs.

    SDXL's UNet (``addition_embed_type == "text_time"``) also gets its added conditions: the
    pooled text embedding (1280 wide) and the six time ids (original size, crop, target size).
    """
    pipeline = bench.manager.pipeline
    unet = pipeline.unet
    config = unet.config
    side = px // pipeline.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(2, config.in_channels, side, side, generator=generator)
    context = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    latents = latents.to(bench.device, unet.dtype)
    context = context.to(bench.device, unet.dtype)
    timestep = torch.tensor(500, device=bench.device)
    added: dict[str, torch.Tensor] | None = None
    if config.addition_embed_type == "text_time":
        pooled_width = (
            config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        )
        pooled = torch.randn(2, pooled_width, generator=generator)
        time_ids = torch.tensor([[px, px, 0, 0, px, px]] * 2, dtype=torch.float32)
        added = {
            "text_embeds": pooled.to(bench.device, unet.dtype),
            "time_ids": time_ids.to(bench.device, unet.dtype),
        }

    def step() -> torch.Tensor:
        with torch.no_grad():
            output: torch.Tensor = unet(
                latents, timestep, encoder_hidden_states=context, added_cond_kwargs=added
            )[0]
        return output

    return step


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
            faults = minor_faults()
            start = bench.clock.now()
            outputs[key] = step()
            elapsed = bench.clock.now() - start
            if round_index > 0:
                samples.setdefault(f"{key}_{position}", []).append(elapsed)
                samples.setdefault(f"{key}_{position}_faults", []).append(minor_faults() - faults)

    # No gc.collect() here: the step right after one is measurably slower on the tiny model.
    for round_index in range(bench.repeats + 1):
        two_steps("base", round_index)
        with manager.apply_loras(bench.requests):
            two_steps("fused", round_index)
        try:
            naive_load(manager.pipeline, bench.requests, bench.spec.lora_components)
            two_steps("unfused", round_index)
        finally:
            naive_unload(manager.pipeline)
    base_before = outputs["base"]
    base_after = step()
    fused_out, unfused_out = outputs["fused"].float(), outputs["unfused"].float()
    difference = (fused_out - unfused_out).abs().max().item()
    lora_effect = (unfused_out - base_before.float()).abs().max().item()

    def first(key: str) -> str:
        # Page faults are the allocator's doing (buffers given back to the OS and faulted in
        # again each step), not the weights': they explain a step slower than its FLOPs.
        faults = statistics.median(samples[f"{key}_steady_faults"])
        return (
            f"first step after the change {statistics.median(samples[f'{key}_first']):.1f} ms; "
            f"{faults:.0f} minor page faults per step"
        )

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
