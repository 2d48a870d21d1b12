"""Classify LoRA files and check that a LoRA fits a loaded pipeline before applying it.

Two checks, both refusing with a sentence an end user can act on:

* :func:`inspect_lora_header` (at upload) looks only at the safetensors header (names, dtypes,
  shapes, metadata; no tensor data): which key format the file uses, which model parts it
  targets, and whether diffusers 0.42 + peft 0.21 can apply it to a Stable Diffusion pipeline
  at all. It refuses full checkpoints, unrelated files, LoRA variants diffusers cannot apply
  (LoHa, LoKr, (IA)³, OFT, GLoRA, Kohya DoRA, ...), incomplete or inconsistent layers and mixed
  formats, and finally runs diffusers' own key conversion on placeholder tensors, so a file it
  accepts is one diffusers can read.
* :func:`check_lora_fits_pipeline` (at generation, before touching the pipeline's adapters)
  converts the real file with the pipeline's own ``lora_state_dict`` and the same per-component
  conversion diffusers applies when loading, then checks every layer against the loaded model:
  the target module must exist and every LoRA matrix must have the size peft will create for
  it. diffusers itself would apply a LoRA partially when some layers do not exist, or fail half
  way with a size mismatch; this check refuses both up front and never modifies the pipeline.

What diffusers 0.42.1 does with each variant on ``StableDiffusionPipeline`` was measured on
the tiny embedded pipeline (see the tests and ``/work/shared`` notes).

This module holds the two entry points; the key grammar and per-layer header checks are in
:mod:`~app.features.loras.lora_keys`, diffusers' key conversion and the shape checks in
:mod:`~app.features.loras.lora_fit`, and the public types (re-exported here) in
:mod:`~app.features.loras.lora_types`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.features.loras.lora_fit import (
    check_component_metadata,
    convert_component,
    group_modules,
    incompatibility_message,
    shape_problem,
    split_components,
)
from app.features.loras.lora_keys import (
    KNOWN_COMPONENTS,
    LORA_ADAPTER_METADATA_KEY,
    UNSUPPORTED_VARIANTS,
    KeyLayer,
    ParsedKey,
    check_adapter_metadata,
    check_layer,
    component_order,
    describe_non_lora,
    parse_key,
)
from app.features.loras.lora_types import (
    IncompatibleLoRAError,
    InvalidLoRAError,
    LoRAFormat,
    LoRAInspection,
    examples,
    first_line,
)
from app.features.loras.safetensors_file import (
    SafetensorsError,
    SafetensorsHeader,
    read_header,
)

__all__ = [
    "IncompatibleLoRAError",
    "InvalidLoRAError",
    "LoRAFormat",
    "LoRAInspection",
    "check_lora_fits_pipeline",
    "inspect_lora_header",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Upload-time inspection (header only)


def inspect_lora_header(header: SafetensorsHeader) -> LoRAInspection:
    """Classify a LoRA from its safetensors header alone; raise :class:`InvalidLoRAError` if it
    is not a LoRA that diffusers can apply to a Stable Diffusion pipeline."""
    if header.invalid_metadata_keys:
        raise InvalidLoRAError(
            "The file's metadata has entries that are not text "
            f"({examples(header.invalid_metadata_keys)}); the safetensors loader refuses such "
            "files."
        )
    keys = list(header.tensors)
    for pattern, message in UNSUPPORTED_VARIANTS:
        if any(pattern.search(key) for key in keys):
            raise InvalidLoRAError(message)

    parsed: dict[str, ParsedKey] = {}
    unknown: list[str] = []
    for key in keys:
        result = parse_key(key)
        if result is None:
            unknown.append(key)
        else:
            parsed[key] = result
    if not parsed:
        raise InvalidLoRAError(describe_non_lora(keys))
    if unknown:
        raise InvalidLoRAError(
            f"{len(unknown)} of the file's {len(keys)} tensors are not LoRA weights "
            f"({examples(unknown)}); diffusers refuses files with such entries."
        )

    formats = {item.format for item in parsed.values()}
    if len(formats) > 1:
        names = " and ".join(sorted(fmt.value for fmt in formats))
        raise InvalidLoRAError(
            f"The file mixes LoRA key formats ({names}); diffusers can only read one at a time."
        )
    fmt = formats.pop()

    unknown_components = sorted({p.component for p in parsed.values()} - set(KNOWN_COMPONENTS))
    if unknown_components:
        raise InvalidLoRAError(
            "The LoRA's layer names do not say which part of the model they belong to (they start "
            f"with {examples(c + '.' for c in unknown_components)} instead of 'unet.' or "
            "'text_encoder.'); diffusers would silently load nothing from it."
        )

    layers: dict[tuple[str, str], KeyLayer] = {}
    for key, item in parsed.items():
        layer = layers.setdefault(
            (item.component, item.module), KeyLayer(item.component, item.module)
        )
        if item.role in layer.tensors:
            raise InvalidLoRAError(
                f"Layer '{item.module}' has two {item.role} weights "
                f"('{layer.tensors[item.role][0]}' and '{key}')."
            )
        layer.tensors[item.role] = (key, header.tensors[key])

    layer_ranks: list[int] = []
    convolution = False
    for layer in layers.values():
        rank, is_conv = check_layer(layer)
        layer_ranks.append(rank)
        convolution = convolution or is_conv

    if LORA_ADAPTER_METADATA_KEY in header.metadata:
        check_adapter_metadata(header.metadata[LORA_ADAPTER_METADATA_KEY], layers.values())

    _dry_run_diffusers_conversion(header)

    if any("magnitude" in layer.tensors for layer in layers.values()):
        network_type = "dora"
    elif convolution:
        network_type = "locon"
    else:
        network_type = "lora"
    components = tuple(sorted({c for c, _ in layers}, key=component_order))
    return LoRAInspection(
        format=fmt,
        components=components,
        network_type=network_type,
        layer_count=len(layers),
        ranks=tuple(sorted(set(layer_ranks))),
        layer_ranks=tuple(layer_ranks),
    )


def _dry_run_diffusers_conversion(header: SafetensorsHeader) -> None:
    """Run diffusers' Stable Diffusion key conversion on placeholder tensors (no data read)."""
    import torch
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    placeholders: dict[str, Any] = {}
    for key, info in header.tensors.items():
        if key.endswith(".alpha"):
            placeholders[key] = torch.ones(())
        else:
            placeholders[key] = torch.empty(info.shape, device="meta")
    try:
        state_dict, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(placeholders)
        for component, part in split_components(state_dict).items():
            convert_component(component, part, keep_text_model=False)
    except InvalidLoRAError:
        raise
    except Exception as error:
        raise InvalidLoRAError(f"diffusers cannot read this LoRA: {first_line(error)}") from None


# ---------------------------------------------------------------------------------------------
# Generation-time fit check


def check_lora_fits_pipeline(path: Path, pipeline: Any, display_name: str) -> None:
    """Refuse (:class:`InvalidLoRAError`, :class:`IncompatibleLoRAError`) a LoRA that diffusers
    would not apply completely and correctly to ``pipeline``. Reads the file; never modifies
    the pipeline."""
    label = f"LoRA '{display_name}'"
    try:
        header = read_header(path)
        inspect_lora_header(header)
    except (SafetensorsError, InvalidLoRAError) as error:
        raise InvalidLoRAError(f"{label} cannot be used: {error}") from None

    if not hasattr(type(pipeline), "lora_state_dict"):
        raise IncompatibleLoRAError(
            f"{label} cannot be used: the loaded model does not support LoRAs.",
            display_name=display_name,
            total_layers=0,
        )
    try:
        state_dict, network_alphas, metadata = type(pipeline).lora_state_dict(
            str(path), use_safetensors=True, return_lora_metadata=True
        )
    except Exception as error:
        raise InvalidLoRAError(
            f"{label} cannot be used: diffusers cannot read it ({first_line(error)})."
        ) from None
    if not state_dict:
        raise InvalidLoRAError(f"{label} cannot be used: it contains no LoRA layers.")
    if not all("lora" in key for key in state_dict):
        raise InvalidLoRAError(
            f"{label} cannot be used: diffusers does not accept its layer names."
        )
    if network_alphas and metadata:
        raise InvalidLoRAError(
            f"{label} cannot be used: it has both per-layer alphas and adapter metadata."
        )

    loadable = getattr(type(pipeline), "_lora_loadable_modules", ["unet", "text_encoder"])
    components: dict[str, Any] = {}
    for name in loadable:
        component = getattr(pipeline, name, None)
        if component is not None and hasattr(component, "named_modules"):
            components[name] = component

    missing: list[str] = []
    mismatched: list[str] = []
    cross_attention: list[tuple[int, int]] = []
    total = 0
    for component_name, part in split_components(state_dict).items():
        component = components.get(component_name)
        if component is None:
            try:
                named = convert_component(component_name, part, keep_text_model=False)
            except InvalidLoRAError:
                named = part
            modules_in_file = {key.split(".lora")[0] for key in named}
            total += len(modules_in_file)
            missing.extend(f"{component_name}.{module}" for module in sorted(modules_in_file))
            continue
        try:
            converted = convert_component(
                component_name, part, keep_text_model=hasattr(component, "text_model")
            )
        except InvalidLoRAError as error:
            raise InvalidLoRAError(f"{label} cannot be used: {error}") from None
        if metadata:
            check_component_metadata(label, component_name, metadata)
        lora_modules = group_modules(label, converted)
        total += len(lora_modules)
        model_modules = dict(component.named_modules())
        for module_name, lora in lora_modules.items():
            target = model_modules.get(module_name)
            if target is None:
                missing.append(f"{component_name}.{module_name}")
                continue
            problem = shape_problem(f"{component_name}.{module_name}", target, lora.tensors)
            if problem is None:
                continue
            mismatched.append(problem[0])
            if problem[1] is not None:
                cross_attention.append(problem[1])

    if missing or mismatched:
        raise IncompatibleLoRAError(
            incompatibility_message(label, total, missing, mismatched, cross_attention),
            display_name=display_name,
            total_layers=total,
            missing_layers=tuple(missing),
            mismatched_layers=tuple(mismatched),
        )
    _warn_about_mixed_alphas(label, network_alphas)


def _warn_about_mixed_alphas(label: str, network_alphas: Mapping[str, float] | None) -> None:
    if not network_alphas:
        return
    counts = collections.Counter(network_alphas.values())
    if len(counts) > 1:
        common = counts.most_common(1)[0][0]
        logger.warning(
            "%s sets different alpha values per layer (%s); diffusers applies the most common "
            "one (%g) to every layer, so it may look different than in other tools.",
            label,
            ", ".join(f"{value:g}" for value in sorted(counts)),
            common,
        )
