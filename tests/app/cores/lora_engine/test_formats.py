"""The engine applies every trainer's file as the trainer meant it, on every family's tiny model.

For each family x format of ``tests.factories.trainer_loras`` (files written as sd-scripts,
LyCORIS, diffusers/PEFT, ai-toolkit, BFL and x-flux write them, with the change each must
cause, computed there by each format's own formula): inside ``PipelineManager.apply_loras``
every module the file touches holds ``base + weight * difference`` (DoRA: its own rule), every
other parameter is untouched, and afterwards every parameter is bit-identical to before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.cores.lora_engine import LoRACache, LoRARequest
from app.cores.model_manager.pipeline_manager import PipelineManager
from tests.factories.family_models import build_family_pipeline
from tests.factories.trainer_loras import (
    TRAINER_CASES,
    TrainerCase,
    WrittenLoRA,
    write_trainer_lora,
)

CASES = [pytest.param(case, id=case.id) for case in TRAINER_CASES]
_Snapshot = dict[tuple[str, str], torch.Tensor]


def _snapshot(pipeline: Any) -> _Snapshot:
    """A copy of every parameter and buffer of every model of the pipeline (VAE included)."""
    copies: _Snapshot = {}
    for component, model in pipeline.components.items():
        if isinstance(model, torch.nn.Module):
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                copies[(component, name)] = tensor.detach().clone()
    return copies


def _apply(case: TrainerCase, tmp_path: Path) -> tuple[Any, WrittenLoRA, _Snapshot]:
    pipeline = build_family_pipeline(case.family)
    written = write_trainer_lora(
        pipeline,
        case.family,
        case.trainer_format,
        tmp_path / f"{case.id}.safetensors",
        alpha=case.alpha,
    )
    return pipeline, written, _snapshot(pipeline)


def _manager(pipeline: Any) -> PipelineManager:
    cache = LoRACache(max_count=16, max_bytes=2**30)
    return PipelineManager(pipeline, "tiny", torch.device("cpu"), lora_cache=cache)


def _mismatches(
    pipeline: Any, written: WrittenLoRA, before: _Snapshot, weight_of: Callable[[str], float]
) -> list[str]:
    """Every parameter that is not what the file at ``weight_of(component)`` makes it."""
    found = []
    current = _snapshot(pipeline)
    for (component, name), base in before.items():
        module, _, kind = name.rpartition(".")
        change = written.expected.get((component, module))
        now = current[(component, name)]
        if change is None or kind not in ("weight", "bias"):
            if not torch.equal(now, base):
                found.append(f"{component}.{name} changed ({(now - base).abs().max():.3g})")
            continue
        weight = weight_of(component)
        if kind == "weight":
            want = change.new_weight(base, weight)
        else:
            want = change.new_bias(base, weight)
        if not torch.allclose(now, want, rtol=1e-4, atol=2e-5):
            error = (now - want).abs().max().item()
            moved = (now - base).abs().max().item()
            found.append(f"{component}.{name}: off by {error:.3g} (moved {moved:.3g})")
    return found


def _restored(pipeline: Any, before: _Snapshot) -> list[str]:
    after = _snapshot(pipeline)
    return [f"{c}.{n}" for (c, n), base in before.items() if not torch.equal(after[(c, n)], base)]


@pytest.mark.parametrize("case", CASES)
def test_the_file_changes_what_its_trainer_meant(case: TrainerCase, tmp_path: Path) -> None:
    pipeline, written, before = _apply(case, tmp_path)
    request = LoRARequest(id=1, name="x", path=written.path, content_key="k", weight=0.7)
    with _manager(pipeline).apply_loras([request]):
        wrong = _mismatches(pipeline, written, before, lambda _: 0.7)
    assert wrong == [], f"{len(wrong)} of {len(before)} parameters wrong: {wrong[:6]}"
    assert _restored(pipeline, before) == []


@pytest.mark.parametrize("case", CASES)
def test_component_weights(case: TrainerCase, tmp_path: Path) -> None:
    """``unet_weight`` applies to the denoiser (``unet`` or ``transformer``),
    ``text_encoder_weight`` to every text encoder."""
    pipeline, written, before = _apply(case, tmp_path)
    request = LoRARequest(
        id=1,
        name="x",
        path=written.path,
        content_key="k",
        weight=0.7,
        unet_weight=0.4,
        text_encoder_weight=1.3,
    )
    with _manager(pipeline).apply_loras([request]):
        wrong = _mismatches(
            pipeline,
            written,
            before,
            lambda component: 1.3 if component.startswith("text_encoder") else 0.4,
        )
    assert wrong == [], f"{len(wrong)} of {len(before)} parameters wrong: {wrong[:6]}"
    assert _restored(pipeline, before) == []
