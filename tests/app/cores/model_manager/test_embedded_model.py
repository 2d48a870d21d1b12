import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.cores.model_manager.embedded_model import build_embedded_model, is_built


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_build_is_deterministic(embedded_model_dir: Path, tmp_path: Path) -> None:
    second = build_embedded_model(tmp_path / "again")
    assert _digest(second) == _digest(embedded_model_dir)
    assert is_built(second)


def test_build_reuses_a_complete_folder(embedded_model_dir: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in embedded_model_dir.rglob("*") if p.is_file()}
    build_embedded_model(embedded_model_dir)
    after = {p: p.stat().st_mtime_ns for p in embedded_model_dir.rglob("*") if p.is_file()}
    assert before == after


def test_build_leaves_no_scratch_folders(tmp_path: Path) -> None:
    build_embedded_model(tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ``tiny_pipeline`` is typed ``Any``: diffusers leaves most of a pipeline's attributes
# (its components, ``__call__``) unannotated.
def test_tokenizer_encodes_any_text_without_unknown_tokens(
    tiny_pipeline: Any,
) -> None:
    tokenizer = tiny_pipeline.tokenizer
    ids = tokenizer("a cat, héllo wörld 🎉").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert len(set(ids[1:-1])) > 5
    assert tokenizer.model_max_length == 77


def test_real_pipeline_generates_a_seeded_image(tiny_pipeline: Any) -> None:
    def generate() -> np.ndarray:
        image = tiny_pipeline(
            "a cat",
            num_inference_steps=4,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(7),
        ).images[0]
        return np.asarray(image)

    first, second = generate(), generate()
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, second)
    assert first.std() > 0
