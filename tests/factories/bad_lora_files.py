"""Realistic bad LoRA files (what users really upload by mistake), re-exported by ``lora_files``."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from tests.factories.lora_files import LoRAFileFormat

# The writers that build on real LoRAs import ``lora_files`` when called: it re-exports this
# module, so importing it here would be circular.


def write_truncated(path: Path, source: Path, *, keep_fraction: float = 0.5) -> Path:
    """``source`` cut inside its data section (the header stays complete)."""
    data = source.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    cut = header_end + int((len(data) - header_end) * keep_fraction)
    cut = min(max(cut, header_end + 1), len(data) - 1)
    path.write_bytes(data[:cut])
    return path


def write_truncated_header(path: Path, source: Path) -> Path:
    """``source`` cut inside its JSON header."""
    data = source.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[: header_end // 2])
    return path


def write_empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_header_bomb(path: Path, *, declared_length: int = 1 << 62) -> Path:
    """A tiny file whose first 8 bytes declare a header of ``declared_length`` bytes."""
    path.write_bytes(struct.pack("<Q", declared_length) + b'{"a": 1}')
    return path


def write_raw_header(path: Path, header: bytes | str | object, data: bytes = b"") -> Path:
    """A file with exactly this header (bytes, text, or an object dumped as JSON) and data."""
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def write_pickle_renamed(path: Path, *, zip_format: bool = True) -> Path:
    """A real ``torch.save`` checkpoint (pickle) named like a safetensors file."""
    state = {"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}
    torch.save(state, str(path), _use_new_zipfile_serialization=zip_format)
    return path


def write_unrelated_tensors(path: Path) -> Path:
    save_file({"foo.weight": torch.zeros(3, 3), "bar": torch.ones(5)}, str(path))
    return path


def write_full_checkpoint_like(path: Path) -> Path:
    """A few keys of an original-layout SD checkpoint (tiny tensors)."""
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(8),
        "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(8),
    }
    save_file(tensors, str(path))
    return path


def write_wrong_shapes(
    path: Path,
    pipeline: Any,
    *,
    kind: Literal["cross_attention", "width"] = "cross_attention",
    fmt: LoRAFileFormat = "kohya",
    rank: int = 4,
    cross_attention_dim: int = 768,
) -> Path:
    """A valid LoRA for modules ``pipeline.unet`` has, with sizes of another model.

    ``"cross_attention"``: every attention projection fits except ``attn2.to_k``/``attn2.to_v``,
    whose A is ``(rank, cross_attention_dim)`` as in a 768-wide (SD 1.x) model.
    ``"width"``: the self-attention ``attn1.to_q`` layers are 320 wide (SD 1.x's first block).
    """
    from tests.factories.lora_files import _kohya_name, lora_targets, random_lora_weights

    chosen = lora_targets(pipeline, ("unet",))
    weights = random_lora_weights(chosen, rank=rank, seed=0, scale=1.0)
    generator = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    for target, (down, up) in zip(chosen, weights, strict=True):
        if kind == "cross_attention" and target.name.endswith(("attn2.to_k", "attn2.to_v")):
            down = torch.randn(rank, cross_attention_dim, generator=generator) * 0.03
        elif kind == "width" and target.name.endswith("attn1.to_q"):
            down = torch.randn(rank, 320, generator=generator) * 0.05
            up = torch.randn(320, rank, generator=generator) * 0.5
        if fmt == "kohya":
            stem = _kohya_name(target)
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
        else:
            tensors[f"unet.{target.name}.lora_A.weight"] = down
            tensors[f"unet.{target.name}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


UNKNOWN_MODULES: tuple[str, ...] = (
    "down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_k",
)
"""Modules a bigger UNet has and the tiny one does not (it has two down blocks)."""


def write_unknown_modules(
    path: Path,
    pipeline: Any,
    *,
    fmt: LoRAFileFormat = "kohya",
    with_valid_layers: bool = True,
    rank: int = 4,
) -> Path:
    """A LoRA whose layers include :data:`UNKNOWN_MODULES` (plus, by default, valid layers for
    every UNet attention projection: diffusers would then apply it partially)."""
    from tests.factories.lora_files import lora_targets, random_lora_weights

    tensors: dict[str, torch.Tensor] = {}
    if with_valid_layers:
        chosen = lora_targets(pipeline, ("unet",))
        for target, (down, up) in zip(
            chosen, random_lora_weights(chosen, rank=rank, seed=0, scale=1.0), strict=True
        ):
            _put(tensors, fmt, target.name, down, up, rank)
    generator = torch.Generator().manual_seed(2)
    for name in UNKNOWN_MODULES:
        down = torch.randn(rank, 32, generator=generator) * 0.1
        up = torch.randn(32, rank, generator=generator) * 0.1
        _put(tensors, fmt, name, down, up, rank)
    save_file(tensors, str(path))
    return path


def _put(
    tensors: dict[str, torch.Tensor],
    fmt: LoRAFileFormat,
    unet_module: str,
    down: torch.Tensor,
    up: torch.Tensor,
    rank: int,
) -> None:
    if fmt == "kohya":
        stem = "lora_unet_" + unet_module.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    else:
        tensors[f"unet.{unet_module}.lora_A.weight"] = down
        tensors[f"unet.{unet_module}.lora_B.weight"] = up


_KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def write_down_without_up(path: Path, pipeline: Any, *, fmt: LoRAFileFormat = "kohya") -> Path:
    """A real LoRA for ``pipeline`` whose first layer lost its up/B weight."""
    from safetensors.torch import load_file

    from tests.factories.lora_files import write_lora

    write_lora(path, pipeline, fmt=fmt)
    tensors = load_file(str(path))
    up_key = next(
        key
        for key in sorted(tensors)
        if key.endswith((".lora_up.weight", ".lora_B.weight", ".up.weight"))
    )
    del tensors[up_key]
    save_file(tensors, str(path))
    return path
