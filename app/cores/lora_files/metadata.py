"""What a LoRA is, for the people choosing one: extracted once, at upload, from the copy.

Everything comes from the safetensors header (key names, shapes, ``__metadata__``) plus the
few bytes of the per-layer ``alpha`` scalars; no weight data is loaded. The metadata is
written by whoever made or last edited the file, so it is treated as untrusted text: every
value is cleaned (control and bidi-override characters removed, unpaired surrogates
replaced) and bounded (each value, the number of keys and the total), JSON inside values is
parsed with size limits and any parse failure drops just that field. A LoRA whose metadata is
garbage still uploads and works; it only shows less.

Fields and where they come from:

* ``format``, ``network_type``, ``components``, ranks: the key grammar (``lora_inspector``).
  Components of an MMDiT (SD3/FLUX) LoRA are ``transformer`` even when Kohya calls them
  ``lora_unet_``.
* ``alpha``: the ``.alpha`` tensors (Kohya), else ``*.lora_alpha`` in diffusers'
  ``lora_adapter_metadata``, else ``ss_network_alpha``; the most common value; None when the
  file stores none (diffusers then uses alpha = rank).
* ``base_model``: :mod:`app.cores.lora_files.base_model`.
* ``trigger_words``: explicit fields first (``modelspec.trigger_phrase``, A1111's
  additional-networks ``ssmd_keywords``, a few generic names), else the most frequent caption
  tags of ``ss_tag_frequency`` (``{dataset: {tag: count}}``, counts summed over datasets).
  ``ss_output_name`` is the training run's file name, not a trigger.
* ``title``/``description``/``author``: ``modelspec.*``, else ``ssmd_*``.

The result is a :class:`~app.database.models.LoRAFacts`, stored whole and shown as is.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from app.cores.lora_files.base_model_verdict import base_model_of, conflict_note
from app.cores.lora_files.inspection_types import LoRAInspection
from app.cores.lora_files.safetensors_file import SafetensorsHeader
from app.cores.model_manager.model_family import ModelFamily
from app.database.models import LoRAFacts

MAX_METADATA_BYTES = 64 * 1024
"""Budget for the raw metadata kept per LoRA (UTF-8 bytes of keys and values)."""
MAX_VALUE_CHARS = 4096
MAX_KEY_CHARS = 200
MAX_KEYS = 256
MAX_TITLE_CHARS = 200
MAX_TRIGGER_WORDS = 8
"""Taken from caption-tag frequencies; explicit trigger fields may give up to twice this."""
MAX_WORD_CHARS = 100
MAX_JSON_CHARS = 16 * 1024 * 1024
"""Larger JSON values (megabytes of tags) are not parsed at all."""
MAX_ALPHA_READS = 10_000

_TRUNCATION_MARK = "…"
# Terminal escape sequences (ANSI CSI, e.g. colours), then C0/C1 controls except tab and
# newline, bidi overrides and isolates (text-direction tricks).
_ANSI_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_UNSAFE_CHARACTERS = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
_WHITESPACE = re.compile(r"\s+")

_EXPLICIT_TRIGGER_KEYS = (
    "modelspec.trigger_phrase",
    "ssmd_keywords",
    "trigger_phrase",
    "trigger_words",
    "activation_text",
)
_TITLE_KEYS = ("modelspec.title", "ssmd_display_name")
_DESCRIPTION_KEYS = ("modelspec.description", "ssmd_description")
_AUTHOR_KEYS = ("modelspec.author", "ssmd_author")
_MMDIT_FAMILIES = frozenset({ModelFamily.SD3, ModelFamily.FLUX})
_SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h"}


def clean_text(value: str, limit: int) -> tuple[str, bool]:
    """``value`` made safe to store and show, cut to ``limit`` characters; (text, was cut)."""
    head = value[: limit * 2]
    text = head.encode("utf-8", "replace").decode("utf-8")
    text = _UNSAFE_CHARACTERS.sub("", _ANSI_SEQUENCE.sub("", text))
    cut = len(head) < len(value) or len(text) > limit
    if len(text) > limit:
        text = text[: limit - 1] + _TRUNCATION_MARK
    return text, cut


def bounded_metadata(metadata: Mapping[str, str]) -> tuple[dict[str, str], bool]:
    """The metadata cleaned and bounded; small entries are kept first when over budget."""
    truncated = len(metadata) > MAX_KEYS
    entries: dict[str, str] = {}
    for key, value in list(metadata.items())[:MAX_KEYS]:
        clean_key, key_cut = clean_text(key, MAX_KEY_CHARS)
        clean_value, value_cut = clean_text(value, MAX_VALUE_CHARS)
        truncated = truncated or key_cut or value_cut
        entries[clean_key] = clean_value
    kept: dict[str, str] = {}
    used = 0
    for key, value in sorted(entries.items(), key=lambda item: (len(item[1]), item[0])):
        size = len(key.encode()) + len(value.encode())
        if used + size > MAX_METADATA_BYTES:
            truncated = True
            continue
        kept[key] = value
        used += size
    return dict(sorted(kept.items())), truncated


def _word(text: object) -> str:
    if not isinstance(text, str):
        return ""
    cleaned, _ = clean_text(text, MAX_WORD_CHARS)
    return _WHITESPACE.sub(" ", cleaned).strip(" ,")


def _unique(words: Iterable[str]) -> list[str]:
    seen: dict[str, str] = {}
    for word in words:
        if word and word.lower() not in seen:
            seen[word.lower()] = word
    return list(seen.values())


def _number(value: object) -> float | None:
    """A finite JSON number as a float; None for anything else (bools, huge ints, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) else None


def _parse_json(raw: str) -> object:
    if len(raw) > MAX_JSON_CHARS:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, a 4300+ digit number, or nested too deep
        return None


def _split_phrases(raw: str) -> list[str]:
    if raw.lstrip().startswith("["):
        parsed = _parse_json(raw)
        if isinstance(parsed, list):
            return [_word(item) for item in parsed[: MAX_TRIGGER_WORDS * 4]]
    return [_word(part) for part in re.split(r"[,\n]", raw[:MAX_VALUE_CHARS])]


def top_tags(raw: str | None, limit: int = MAX_TRIGGER_WORDS) -> list[str]:
    """The most frequent caption tags of an ``ss_tag_frequency`` value; [] if unusable."""
    data = _parse_json(raw) if raw else None
    if not isinstance(data, dict):
        return []
    counts: dict[str, float] = {}
    for dataset in data.values():
        if not isinstance(dataset, dict):
            continue
        for tag, raw_count in dataset.items():
            count = _number(raw_count)
            word = _word(tag)
            if word and count is not None and count > 0:
                counts[word] = counts.get(word, 0.0) + count
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return _unique(word for word, _ in ranked)[:limit]


def trigger_words(metadata: Mapping[str, str]) -> list[str]:
    explicit: list[str] = []
    for key in _EXPLICIT_TRIGGER_KEYS:
        value = metadata.get(key)
        if value:
            explicit += _split_phrases(value)
    words = _unique(explicit)[: MAX_TRIGGER_WORDS * 2]
    return words or top_tags(metadata.get("ss_tag_frequency"))


def _first_text(metadata: Mapping[str, str], keys: Iterable[str], limit: int) -> str | None:
    for key in keys:
        value = metadata.get(key)
        if value and value.strip():
            text, _ = clean_text(value.strip(), limit)
            if limit <= MAX_TITLE_CHARS:
                text = _WHITESPACE.sub(" ", text)
            return text
    return None


def _scalar(raw: bytes, dtype: str) -> float | None:
    if dtype == "BF16" and len(raw) == 2:
        value: float = struct.unpack("<f", b"\0\0" + raw)[0]
    elif dtype in _SCALAR_FORMATS and len(raw) == struct.calcsize(_SCALAR_FORMATS[dtype]):
        value = struct.unpack(_SCALAR_FORMATS[dtype], raw)[0]
    else:
        return None
    return float(value) if math.isfinite(value) else None


def _most_common(values: Iterable[float]) -> float | None:
    counts = Counter(values)
    if not counts:
        return None
    best = max(counts.values())
    return max(value for value, count in counts.items() if count == best)


def stored_alpha(path: Path, header: SafetensorsHeader) -> float | None:
    """The most common alpha the file stores (see the module docstring); None if none."""
    alpha_keys = [key for key in header.tensors if key.endswith(".alpha")][:MAX_ALPHA_READS]
    values: list[float] = []
    if alpha_keys:
        fd = os.open(path, os.O_RDONLY)
        try:
            for key in alpha_keys:
                info = header.tensors[key]
                if info.numel != 1:
                    continue
                raw = os.pread(fd, info.nbytes, header.data_start + info.data_offsets[0])
                value = _scalar(raw, info.dtype)
                if value is not None:
                    values.append(value)
        finally:
            os.close(fd)
    if not values:
        config = _parse_json(header.metadata.get("lora_adapter_metadata", ""))
        if isinstance(config, dict):
            numbers = (
                _number(value)
                for key, value in config.items()
                if key.rsplit(".", 1)[-1] == "lora_alpha"
            )
            values = [number for number in numbers if number is not None]
    if not values:
        try:
            network_alpha = float(header.metadata.get("ss_network_alpha", ""))
        except ValueError:
            return None
        return network_alpha if math.isfinite(network_alpha) else None
    return _most_common(values)


def _rank(inspection: LoRAInspection) -> tuple[int | None, int | None]:
    ranks = inspection.layer_ranks or inspection.ranks
    if not ranks:
        return None, None
    common = _most_common(ranks)
    return (int(common) if common is not None else None), max(ranks)


def describe_lora(
    path: Path,
    header: SafetensorsHeader,
    inspection: LoRAInspection,
    tensor_sha256: str | None,
    *,
    trained_words: Sequence[str] = (),
) -> LoRAFacts:
    """Everything the UI shows about a validated LoRA file; never raises for bad metadata.
    ``trained_words``: the trigger words its source names (CivitAI), used when the file
    names none."""
    metadata = header.metadata
    base = base_model_of(header)
    components = list(inspection.components)
    if base.family.architecture in _MMDIT_FAMILIES:
        components = _unique("transformer" if c == "unet" else c for c in components)
    rank, rank_max = _rank(inspection)
    raw, truncated = bounded_metadata(metadata)
    claim = base.claim
    return LoRAFacts(
        format=inspection.format.value,
        components=tuple(components),
        network_type=inspection.network_type,
        rank=rank,
        rank_max=rank_max,
        alpha=stored_alpha(path, header),
        base_model=base.family.value,
        base_model_evidence=clean_text(base.evidence, MAX_VALUE_CHARS)[0],
        base_model_metadata=claim.family.value if claim else None,
        base_model_metadata_source=(
            clean_text(f"{claim.key}: {claim.value}", MAX_KEY_CHARS)[0] if claim else None
        ),
        base_model_conflict=base.conflict,
        base_model_note=clean_text(note, MAX_VALUE_CHARS)[0]
        if (note := conflict_note(base))
        else None,
        trigger_words=tuple(trigger_words(metadata) or trained_words[: MAX_TRIGGER_WORDS * 2]),
        title=_first_text(metadata, _TITLE_KEYS, MAX_TITLE_CHARS),
        description=_first_text(metadata, _DESCRIPTION_KEYS, MAX_VALUE_CHARS),
        author=_first_text(metadata, _AUTHOR_KEYS, MAX_TITLE_CHARS),
        metadata=raw,
        metadata_truncated=truncated,
        tensor_sha256=tensor_sha256,
    )
