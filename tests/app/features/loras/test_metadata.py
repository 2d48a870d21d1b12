"""LoRA details extracted at upload: format, ranks, alpha, base model, trigger words, text
fields, bounded raw metadata and hashes. Through HTTP with real files, plus unit tests of the
extraction helpers on hostile values."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from app.config import Settings
from app.cores.lora_files.hashes import PayloadHasher
from app.cores.lora_files.metadata import (
    MAX_METADATA_BYTES,
    MAX_VALUE_CHARS,
    bounded_metadata,
    clean_text,
    stored_alpha,
    top_tags,
    trigger_words,
)
from app.cores.lora_files.safetensors_file import read_header
from tests.api import generate, list_loras, upload, upload_ok
from tests.checksums import payload_sha256
from tests.factories.lora_files import write_lora, write_raw_header
from tests.harness import database_file, running_app

TAG_FREQUENCY = json.dumps(
    {
        "10_zkz style": {"zkz style": 40, "1girl": 25, " outdoors ": 12, "solo": 25},
        "5_extra": {"zkz style": 10, "night": 3, "": 99, "bad": "many"},
    }
)


async def upload_listed(client: httpx.AsyncClient, path: Path) -> dict[str, Any]:
    """Upload ``path``; its description, the same in the list and by id."""
    info = await upload_ok(client, path)
    assert info in await list_loras(client)
    assert (await client.get(f"/loras/{info['id']}")).json() == info
    return info


def with_metadata(path: Path, target: Path, metadata: dict[str, str]) -> Path:
    """The tensors of ``path`` saved again with ``metadata``."""
    save_file(load_file(str(path)), str(target), metadata)
    return target


# ---------------------------------------------------------------------------------------------
# Through HTTP


async def test_a_described_kohya_lora(
    client: httpx.AsyncClient, tiny_pipeline: Any, user_dir: Path
) -> None:
    path = write_lora(
        user_dir / "zkz.safetensors",
        tiny_pipeline,
        components=("unet", "text_encoder"),
        alpha=2.0,
        metadata={
            "modelspec.title": "ZKZ\nStyle",
            "modelspec.description": "A style.\nTrained on 50 images.",
            "modelspec.author": "someone",
            "modelspec.trigger_phrase": "zkz style, ink lines",
            "ss_tag_frequency": TAG_FREQUENCY,
            "ss_output_name": "zkz_v3_final",
            "ss_base_model_version": "sd_v1",
        },
    )
    info = await upload_listed(client, path)

    assert info["format"] == "kohya"
    assert info["components"] == ["unet", "text_encoder"]
    assert info["network_type"] == "lora"
    assert (info["rank"], info["rank_max"], info["alpha"]) == (4, 4, 2.0)
    assert info["base_model"] == "tiny"
    assert "cross-attention input width 32" in info["base_model_evidence"]
    assert info["base_model_metadata"] == "sd1"
    assert info["base_model_metadata_source"] == "ss_base_model_version: sd_v1"
    assert info["base_model_conflict"] is True
    assert "Stable Diffusion 1.x" in info["base_model_note"]
    assert info["compatible"] is None  # no model loaded
    assert info["trigger_words"] == ["zkz style", "ink lines"]  # explicit phrase first
    assert info["title"] == "ZKZ Style"
    assert info["description"] == "A style.\nTrained on 50 images."
    assert info["author"] == "someone"
    assert info["metadata"]["ss_output_name"] == "zkz_v3_final"
    assert info["metadata"]["ss_tag_frequency"] == TAG_FREQUENCY
    assert info["metadata_truncated"] is False
    full = hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["sha256"] == full
    assert info["autov2"] == full[:10]
    assert info["tensor_sha256"] == payload_sha256(path)
    assert info["autov3"] == payload_sha256(path)[:12]


async def test_trigger_words_from_tag_frequency_never_the_output_name(
    client: httpx.AsyncClient, tiny_pipeline: Any, user_dir: Path
) -> None:
    path = write_lora(
        user_dir / "tags.safetensors",
        tiny_pipeline,
        metadata={"ss_tag_frequency": TAG_FREQUENCY, "ss_output_name": "my_output"},
    )
    info = await upload_listed(client, path)
    # Summed over datasets, most frequent first, ties by name; blanks and non-counts dropped.
    assert info["trigger_words"] == ["zkz style", "1girl", "solo", "outdoors", "night"]
    assert info["title"] is None
    assert info["base_model_metadata"] is None
    assert info["base_model_conflict"] is False


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param({"fmt": "peft", "alpha": 2.0}, ("peft", "lora", 2.0), id="peft-alpha"),
        pytest.param({"fmt": "peft"}, ("peft", "lora", None), id="peft-no-alpha"),
        pytest.param({"fmt": "diffusers_legacy"}, ("diffusers_legacy", "lora", None), id="legacy"),
        pytest.param({"include_conv": True}, ("kohya", "locon", 4.0), id="locon"),
        pytest.param({"fmt": "peft", "dora": True}, ("peft", "dora", None), id="dora"),
    ],
)
async def test_format_network_type_and_alpha(
    client: httpx.AsyncClient,
    tiny_pipeline: Any,
    user_dir: Path,
    options: dict[str, Any],
    expected: tuple[str, str, float | None],
) -> None:
    path = write_lora(user_dir / "x.safetensors", tiny_pipeline, **options)
    info = await upload_listed(client, path)
    assert (info["format"], info["network_type"], info["alpha"]) == expected
    assert info["base_model"] == "tiny"


async def test_most_common_rank_and_the_largest(
    client: httpx.AsyncClient, tiny_pipeline: Any, user_dir: Path
) -> None:
    low = write_lora(
        user_dir / "a.safetensors", tiny_pipeline, rank=4, targets=("to_q", "to_k", "to_v")
    )
    high = write_lora(user_dir / "b.safetensors", tiny_pipeline, rank=8, targets=("to_out.0",))
    save_file(load_file(str(low)) | load_file(str(high)), str(user_dir / "mixed.safetensors"))
    info = await upload_listed(client, user_dir / "mixed.safetensors")
    assert (info["rank"], info["rank_max"]) == (4, 8)


async def test_metadata_edits_keep_the_tensor_hash(
    client: httpx.AsyncClient, tiny_pipeline: Any, user_dir: Path
) -> None:
    original = write_lora(user_dir / "v1.safetensors", tiny_pipeline, seed=7)
    edited = with_metadata(original, user_dir / "v1 renamed.safetensors", {"ssmd_keywords": "x"})
    first = await upload_listed(client, original)
    second = await upload_listed(client, edited)  # other bytes: not a duplicate
    assert first["sha256"] != second["sha256"]
    assert first["tensor_sha256"] == second["tensor_sha256"] == payload_sha256(original)
    assert first["autov3"] == second["autov3"]
    assert second["trigger_words"] == ["x"]


def hostile_metadata() -> dict[str, str]:
    """What a broken or malicious trainer can put in ``__metadata__`` (strings only: the
    format allows nothing else)."""
    nested = "[" * 100_000 + "]" * 100_000
    huge_tags = {"set": {f"tag{i}": i for i in range(60_000)}}
    return {
        "ss_tag_frequency": json.dumps(huge_tags),  # over a megabyte of tags
        "modelspec.trigger_phrase": nested,  # "JSON" nested far too deep
        "ssmd_keywords": "{not json",
        "modelspec.title": "\x1b[31mred\x00 \u202eevil\u202c\r\nname",
        "modelspec.description": "d" * 1_000_000,
        "lora_notes": "\x07" * 10,
        **{f"extra_{i:04}": "v" * 300 for i in range(400)},  # many keys, 120 KB in all
    }


async def test_hostile_metadata_never_breaks_upload_or_listing_and_the_lora_works(
    loaded_client: httpx.AsyncClient, tiny_pipeline: Any, user_dir: Path
) -> None:
    path = write_lora(user_dir / "hostile.safetensors", tiny_pipeline, metadata=hostile_metadata())
    info = await upload_listed(loaded_client, path)

    assert info["metadata_truncated"] is True
    size = sum(len(k.encode()) + len(v.encode()) for k, v in info["metadata"].items())
    assert size <= MAX_METADATA_BYTES
    assert all(len(value) <= MAX_VALUE_CHARS for value in info["metadata"].values())
    assert all(
        ch in "\n\t" or ch.isprintable()
        for text in [*info["metadata"].values(), info["title"]]
        for ch in text
    )
    assert info["title"] == "red evil name"
    assert len(info["description"]) == MAX_VALUE_CHARS
    # The deep "JSON" is split as text; the huge tag list is parsed and ranked.
    assert info["trigger_words"][-1] == "{not json"
    assert info["base_model"] == "tiny"
    assert info["compatible"] is True

    response = await generate(loaded_client, [{"lora_id": info["id"], "weight": 1.0}])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        pytest.param(
            {"ss_network_dim": 4}, "metadata has entries that are not text", id="not-text"
        ),
        pytest.param({"x": "\\ud800"}, "not valid unicode", id="lone-surrogate"),
    ],
)
async def test_metadata_the_safetensors_library_refuses_is_refused(
    client: httpx.AsyncClient, user_dir: Path, metadata: dict[str, Any], problem: str
) -> None:
    # safetensors 0.8 (Rust) refuses to open both files, so diffusers could not load them.
    tensors = {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1, 2]}}
    header: dict[str, Any] = {
        key: {**value, "data_offsets": [0, 8]} for key, value in tensors.items()
    }
    raw = json.dumps({**header, "__metadata__": metadata}).replace("\\\\ud800", "\\ud800")
    path = write_raw_header(user_dir / "bad meta.safetensors", raw, b"\0" * 8)
    response = await upload(client, path)
    assert response.status_code == 400, response.text
    assert problem in response.json()["detail"].lower()
    assert "bad meta.safetensors" in response.json()["detail"]


# ---------------------------------------------------------------------------------------------
# Rows added before the details were stored


async def test_old_rows_are_described_at_start(
    settings: Settings, tiny_pipeline: Any, user_dir: Path
) -> None:
    path = write_lora(user_dir / "old.safetensors", tiny_pipeline, metadata={"ssmd_author": "me"})
    async with running_app(settings) as (_, client):
        described = await upload_listed(client, path)
    # As migration 0003 leaves an old row:
    with sqlite3.connect(database_file(settings)) as connection:
        connection.execute("UPDATE loras SET facts = NULL")
    async with running_app(settings) as (_, client):
        again = (await client.get(f"/loras/{described['id']}")).json()
    assert {**again, "updated_at": None} == {**described, "updated_at": None}


# ---------------------------------------------------------------------------------------------
# Helpers on their own


def test_clean_text_removes_controls_and_bidi_and_bounds() -> None:
    text, cut = clean_text("a\x00b\x1b[0m\u202ec\td\ne" + "\ud800", 100)
    assert text == "abc\td\ne?"
    assert not cut
    text, cut = clean_text("x" * 50, 10)
    assert (len(text), text[-1], cut) == (10, "…", True)


def test_bounded_metadata_keeps_small_entries_first() -> None:
    metadata = {"big": "b" * 60_000, "huge": "h" * 100_000, "small": "s"}
    kept, truncated = bounded_metadata(metadata)
    assert truncated
    assert kept["small"] == "s"
    assert len(kept["big"]) == len(kept["huge"]) == MAX_VALUE_CHARS


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "nope",
        "[1, 2]",
        '{"a": [1]}',
        "[" * 50_000,
        '{"a": {"b": 1e400}}',
        '{"a": {"b": ' + "9" * 400 + "}}",
        '{"a": {"b": true}}',
        "1" * 5000,
    ],
)
def test_top_tags_of_unusable_values(raw: str | None) -> None:
    assert top_tags(raw) == []


def test_trigger_word_sources() -> None:
    assert trigger_words({"trigger_words": '["a b", "c", "A B"]'}) == ["a b", "c"]
    assert trigger_words({"ssmd_keywords": "one,two\nthree"}) == ["one", "two", "three"]
    many = {"s": {f"t{i}": 100 - i for i in range(50)}}
    assert trigger_words({"ss_tag_frequency": json.dumps(many)}) == [f"t{i}" for i in range(8)]


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 9, 64, 1 << 20])
def test_payload_hash_in_any_chunk_size(tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(40.0), "b": torch.ones(3)}, str(path), {"k": "v" * 100})
    data = path.read_bytes()
    hasher = PayloadHasher()
    for start in range(0, len(data), chunk):
        hasher.update(data[start : start + chunk])
    assert hasher.hexdigest() == payload_sha256(path)
    cut = PayloadHasher()
    cut.update(data[:20])  # the file ends inside its header
    assert cut.hexdigest() is None


@pytest.mark.parametrize(
    ("tensors", "metadata", "alpha"),
    [
        ({"a.alpha": torch.tensor(3.0, dtype=torch.bfloat16)}, {}, 3.0),
        ({"a.alpha": torch.tensor(2.0), "b.alpha": torch.tensor(2.0)}, {}, 2.0),
        ({"a.alpha": torch.tensor(8, dtype=torch.int64)}, {"ss_network_alpha": "1"}, 8.0),
        ({}, {"lora_adapter_metadata": '{"unet.lora_alpha": 8, "unet.r": 4}'}, 8.0),
        ({}, {"lora_adapter_metadata": '{"unet.lora_alpha": ' + "9" * 400 + "}"}, None),
        ({}, {"lora_adapter_metadata": "{broken", "ss_network_alpha": "16"}, 16.0),
        ({}, {"ss_network_alpha": "nan"}, None),
        ({}, {"ss_network_alpha": "many"}, None),
        ({"a.alpha": torch.tensor(float("inf"))}, {}, None),
    ],
)
def test_alpha_sources(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    alpha: float | None,
) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(1, 2), **tensors}, str(path), metadata)
    assert stored_alpha(path, read_header(path)) == alpha
