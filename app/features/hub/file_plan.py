"""Which files of a Hub repository a pipeline needs, and where each goes on disk.

A diffusers repository often carries far more than its pipeline: root-level single-file
checkpoints and previews (2-7 GB each), ``.bin``/``.ckpt`` pickles next to the safetensors,
Flax and ONNX exports, and several weight variants (``fp16``, ``ema``...). Only
``model_index.json`` and the component folders it names are fetched; of the weights, only
safetensors of one variant per component.

Variant files are stored under their plain names (``diffusion_pytorch_model.fp16.safetensors``
as ``diffusion_pytorch_model.safetensors``, a sharded index rewritten to match), so that the
folder is an ordinary diffusers folder that loads without a ``variant`` argument, in the
dtype the loader asks for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from huggingface_hub import ModelInfo
from huggingface_hub.hf_api import RepoSibling

from app.exceptions import BadRequestError

MODEL_INDEX = "model_index.json"
WEIGHTS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SKIPPED_SUFFIXES = (*PICKLE_SUFFIXES, ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".tflite")
SKIPPED_SUFFIXES_TEXT = (".md", ".png", ".jpg", ".jpeg", ".webp", ".gif")
FP16 = "fp16"
_INDEX = re.compile(r"^(?P<stem>.+\.safetensors)\.index(?:\.(?P<variant>[\w-]+))?\.json$")


@dataclass(frozen=True)
class RepoFile:
    """One file to fetch: its name in the repository, its name on disk, its size."""

    remote_name: str
    local_name: str
    variant: str | None
    """The weight variant fetched (stored under the plain name), or None."""
    size: int | None
    sha256: str | None
    """The LFS object's sha256 (weights), checked after the transfer."""

    @property
    def is_variant_index(self) -> bool:
        """A sharded index naming variant shards: rewritten to their plain names."""
        return (
            self.variant is not None and _INDEX.match(self.remote_name.split("/")[-1]) is not None
        )


@dataclass(frozen=True)
class RepoPlan:
    repo_id: str
    revision: str
    files: tuple[RepoFile, ...]
    variant: str | None
    """The weight variant chosen for at least one component (``fp16``), or None."""

    @property
    def total_bytes(self) -> int:
        return sum(file.size or 0 for file in self.files)


def pipeline_components(model_index: dict[str, Any]) -> list[str]:
    """The component folders ``model_index.json`` names (``[library, class]`` entries)."""
    return sorted(
        name
        for name, value in model_index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and all(isinstance(part, str) for part in value)
    )


def parse_model_index(data: bytes, repo_id: str) -> dict[str, Any]:
    try:
        index = json.loads(data)
    except (ValueError, RecursionError):
        index = None
    if not isinstance(index, dict) or not pipeline_components(index):
        raise BadRequestError(
            f"{repo_id} has a {MODEL_INDEX} that names no pipeline components; it cannot be "
            "loaded as a diffusers pipeline."
        )
    return index


def check_is_pipeline(info: ModelInfo) -> None:
    names = {sibling.rfilename for sibling in info.siblings or []}
    if MODEL_INDEX not in names:
        raise BadRequestError(
            f"{info.id} is not a diffusers pipeline (it has no {MODEL_INDEX}); single-file "
            "checkpoints and LoRAs are added another way."
        )


def _weights_variant(name: str) -> tuple[str, str | None] | None:
    """``(stem, variant)`` of a safetensors weight file or a sharded index, else None."""
    if match := _INDEX.match(name):
        return match.group("stem"), match.group("variant")
    if not name.endswith(WEIGHTS_SUFFIX):
        return None
    stem, _, variant = name.removesuffix(WEIGHTS_SUFFIX).partition(".")
    return stem, (variant or None)


def _plain_name(remote_name: str, variant: str | None) -> str:
    if variant is None:
        return remote_name
    return remote_name.replace(f".{variant}.", ".").replace(f".index.{variant}.json", ".index.json")


def plan_files(info: ModelInfo, model_index: dict[str, Any], *, want_fp16: bool) -> RepoPlan:
    """The files to fetch for ``info``'s pipeline. Refuses a component whose weights are
    pickles only (they can run code when loaded), naming it."""
    revision = info.sha or "main"
    siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
    chosen: list[tuple[str, str | None]] = [(MODEL_INDEX, None)]
    variants_used: set[str] = set()
    for component in pipeline_components(model_index):
        inside = sorted(name for name in siblings if _directly_in(name, component))
        weights = {
            name: split for name in inside if (split := _weights_variant(name.split("/")[-1]))
        }
        pickles = [name for name in inside if name.endswith(PICKLE_SUFFIXES)]
        if pickles and not weights:
            raise BadRequestError(
                f"{info.id} has only pickle weights for its {component} ({pickles[0]}); only "
                "safetensors are downloaded, since pickle files can run code when loaded."
            )
        variant = _choose_variant({split[1] for split in weights.values()}, want_fp16)
        if variant:
            variants_used.add(variant)
        for name in inside:
            if name in weights:
                if weights[name][1] == variant:
                    chosen.append((name, variant))
            elif not name.endswith(SKIPPED_SUFFIXES + SKIPPED_SUFFIXES_TEXT):
                chosen.append((name, None))
    files = tuple(_repo_file(siblings[name], variant) for name, variant in chosen)
    return RepoPlan(info.id, revision, files, FP16 if FP16 in variants_used else None)


def _repo_file(sibling: RepoSibling, variant: str | None) -> RepoFile:
    lfs = sibling.lfs
    return RepoFile(
        remote_name=sibling.rfilename,
        local_name=_plain_name(sibling.rfilename, variant),
        variant=variant,
        size=int(lfs.size) if lfs is not None else sibling.size,
        sha256=lfs.sha256 if lfs is not None else None,
    )


def model_index_file(info: ModelInfo) -> RepoFile:
    sibling = next(s for s in info.siblings or [] if s.rfilename == MODEL_INDEX)
    return _repo_file(sibling, None)


def _directly_in(name: str, component: str) -> bool:
    parts = PurePosixPath(name).parts
    return len(parts) == 2 and parts[0] == component


def _choose_variant(available: set[str | None], want_fp16: bool) -> str | None:
    """fp16 weights when the model runs in float16 and has them; else the plain weights;
    a component with only fp16 weights takes those (they load in any dtype)."""
    if want_fp16 and FP16 in available:
        return FP16
    if None in available or not available:
        return None
    return FP16 if FP16 in available else sorted(v for v in available if v)[0]


def plain_index(data: bytes, variant: str) -> bytes:
    """A sharded index whose weight map names the shards by the plain names they get."""
    index = json.loads(data)
    weight_map = index.get("weight_map", {})
    index["weight_map"] = {key: _plain_name(value, variant) for key, value in weight_map.items()}
    return json.dumps(index, indent=2).encode()
