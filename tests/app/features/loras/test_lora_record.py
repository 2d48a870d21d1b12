"""The LoRA record on its own: the facts and source models, their JSON columns, and the API
view made of a row (``LoRAInfo.of``)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.cores.model_manager.model_family import ModelFamily
from app.database.models import Base, LoRA, LoRAFacts, LoRASource
from app.features.loras.schemas import LoRAEntry, LoRAInfo

FACTS = LoRAFacts(
    format="kohya",
    components=("unet", "text_encoder"),
    network_type="locon",
    rank=4,
    rank_max=8,
    alpha=0.1,
    base_model="sd1",
    base_model_evidence="768-wide cross-attention",
    base_model_metadata="sdxl",
    base_model_metadata_source="ss_base_model_version: sdxl_base_v1-0",
    base_model_conflict=True,
    base_model_note="The metadata says SDXL.",
    trigger_words=("zkz style",),
    title="Title",
    description="Text",
    author="me",
    metadata={"ss_network_dim": "4"},
    metadata_truncated=True,
    tensor_sha256="ab" * 32,
)
SOURCE = LoRASource(source_url="https://example.com/a.safetensors", civitai={"version_id": 1})
WHEN = datetime(2025, 1, 2, 3, 4, 5)


def _row(file_path: Path, facts: LoRAFacts | None, source: LoRASource | None) -> LoRA:
    return LoRA(
        id=7,
        name="style",
        file_path=str(file_path),
        file_size=123,
        sha256="cd" * 32,
        source_path=None,
        facts=facts,
        source=source,
        created_at=WHEN,
        updated_at=WHEN,
    )


def test_info_is_made_of_the_row_its_facts_and_its_source(tmp_path: Path) -> None:
    stored = tmp_path / "style.safetensors"
    stored.write_bytes(b"x")
    info = LoRAInfo.of(_row(stored, FACTS, SOURCE), ModelFamily.SDXL)

    def part(model: type[pydantic.BaseModel]) -> dict[str, Any]:
        return info.model_dump(include=set(model.model_fields))

    assert part(LoRAFacts) == FACTS.model_dump()
    assert part(LoRASource) == SOURCE.model_dump()
    entry = LoRAEntry(
        id=7,
        name="style",
        file_path=str(stored),
        file_size=123,
        sha256="cd" * 32,
        file_missing=False,
        created_at=WHEN,
        updated_at=WHEN,
        compatible=False,  # made for SD 1.x
        autov2="cd" * 5,
        autov3="ab" * 6,
    )
    assert part(LoRAEntry) == entry.model_dump()
    assert LoRAInfo.of(_row(stored, FACTS, SOURCE), ModelFamily.SD1).compatible is True
    assert LoRAInfo.of(_row(stored, FACTS, SOURCE), None).compatible is None


def test_a_row_not_yet_described_shows_nothing_known(tmp_path: Path) -> None:
    info = LoRAInfo.of(_row(tmp_path / "gone.safetensors", None, None), ModelFamily.SD1)
    shown = info.model_dump(mode="json")
    assert shown["file_missing"] is True
    assert {key: shown[key] for key in LoRAFacts.model_fields} == {
        "format": None,
        "components": [],
        "network_type": None,
        "rank": None,
        "rank_max": None,
        "alpha": None,
        "base_model": "unknown",
        "base_model_evidence": None,
        "base_model_metadata": None,
        "base_model_metadata_source": None,
        "base_model_conflict": False,
        "base_model_note": None,
        "trigger_words": [],
        "title": None,
        "description": None,
        "author": None,
        "metadata": {},
        "metadata_truncated": False,
        "tensor_sha256": None,
    }
    assert (shown["source_url"], shown["civitai"], shown["autov3"]) == (None, None, None)
    assert shown["compatible"] is None


def test_the_parts_of_the_view_share_no_field() -> None:
    parts = [set(model.model_fields) for model in (LoRAEntry, LoRAFacts, LoRASource)]
    assert sum(len(fields) for fields in parts) == len(set.union(*parts))
    assert set(LoRAInfo.model_fields) == set.union(*parts)


def test_facts_and_source_are_stored_as_json_and_none_as_sql_null() -> None:
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine, tables=[LoRA.__table__])  # type: ignore[list-item]
    with Session(engine) as session:
        session.add(_row(Path("/a"), FACTS, SOURCE))
        undescribed = _row(Path("/b"), None, None)
        undescribed.id, undescribed.name, undescribed.sha256 = 8, "old", "ef" * 32
        session.add(undescribed)
        session.commit()
    with Session(engine) as session:
        described = session.get_one(LoRA, 7)
        assert (described.facts, described.source) == (FACTS, SOURCE)
        assert session.scalars(sa.select(LoRA.id).where(LoRA.facts.is_(None))).all() == [8]
        assert session.scalars(sa.select(LoRA.id).where(LoRA.source.is_(None))).all() == [8]
    engine.dispose()


def test_a_misspelt_key_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="trigger_word"):
        LoRAFacts.model_validate({"trigger_word": ["x"]})
    with pytest.raises(pydantic.ValidationError):
        FACTS.title = "changed"  # type: ignore[misc]
