"""Loading single-file checkpoints with diffusers' single-file loading and a local config folder.

Each checkpoint is written from the tiny family model of seed 1 and loaded with the configs of
the same family's model of seed 0: the same architecture with other weights, so an image equal
to the seed-1 diffusers folder's proves the weights came from the file (and none from the
config folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from app.cores.lora_files.safetensors_file import read_header
from app.cores.model_manager.checkpoint_files import detect_checkpoint
from app.cores.model_manager.model_family import ModelFamily
from app.cores.model_manager.single_file import (
    ConfigFolderError,
    SingleFileError,
    config_folder_family,
    load_single_file,
    pipeline_class,
)
from tests.factories.checkpoints import write_checkpoint
from tests.factories.family_models import Family, FamilyModelDir

F = ModelFamily
LOADED: tuple[Family, ...] = ("sd1", "sd2", "sdxl", "sd3")
"""The families diffusers 0.42 loads from a single file at the tiny widths (not FLUX.1: see
``single_file``'s docstring)."""


def _image(pipeline: Any) -> np.ndarray[Any, Any]:
    generator = torch.Generator().manual_seed(7)
    result = pipeline(
        "a lighthouse at dusk",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    )
    return np.asarray(result.images[0])


def _reference(folder: Path, family: Family, **components: Any) -> Any:
    pipeline = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **components)
    if family == "sd3":
        # SD3's original layout has no CLIP-L projection to use: SAI's code pools CLIP-L
        # unprojected, and diffusers sets the projection to the identity when it loads a file.
        with torch.no_grad():
            weight = pipeline.text_encoder.text_projection.weight
            weight.copy_(torch.eye(*weight.shape))
    return pipeline


@pytest.mark.parametrize("family", LOADED)
def test_a_checkpoint_generates_the_image_of_the_folder_it_was_written_from(
    family: Family, family_model_dir: FamilyModelDir, tmp_path: Path
) -> None:
    path = write_checkpoint(family, tmp_path / f"{family}.safetensors", seed=1)
    pipeline = load_single_file(path, family_model_dir(family, seed=0))
    assert type(pipeline).__name__ == type(_reference(family_model_dir(family), family)).__name__
    reference = _reference(family_model_dir(family, seed=1), family)
    for name, component in reference.components.items():
        if isinstance(component, torch.nn.Module):
            loaded = getattr(pipeline, name).state_dict()
            for key, tensor in component.state_dict().items():
                assert torch.equal(loaded[key], tensor), f"{name}.{key}"
    assert np.array_equal(_image(pipeline), _image(reference))


def test_sd3_without_t5_runs_without_it(family_model_dir: FamilyModelDir, tmp_path: Path) -> None:
    path = write_checkpoint("sd3", tmp_path / "sd3.safetensors", seed=1, without={"text_encoder_3"})
    pipeline = load_single_file(path, family_model_dir("sd3"))
    assert (pipeline.text_encoder_3, pipeline.tokenizer_3) == (None, None)
    reference = _reference(
        family_model_dir("sd3", seed=1), "sd3", text_encoder_3=None, tokenizer_3=None
    )
    assert np.array_equal(_image(pipeline), _image(reference))


def test_a_half_precision_file_loads_in_the_dtype_asked_for(
    family_model_dir: FamilyModelDir, tmp_path: Path
) -> None:
    path = write_checkpoint("sd1", tmp_path / "sd1-fp16.safetensors", dtype=torch.float16)
    pipeline = load_single_file(path, family_model_dir("sd1"), torch_dtype=torch.float32)
    reference = _reference(family_model_dir("sd1"), "sd1")
    weight = pipeline.unet.conv_in.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, reference.unet.conv_in.weight.half().float())


def test_a_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    path = write_checkpoint("sd1", tmp_path / "sd1.safetensors")
    (tmp_path / "configs").mkdir()
    with pytest.raises(ConfigFolderError, match=r"it has no readable model_index\.json"):
        load_single_file(path, tmp_path / "configs")
    with pytest.raises(ConfigFolderError, match="is not a diffusers model folder"):
        load_single_file(path, tmp_path / "missing")
    assert issubclass(ConfigFolderError, SingleFileError)
    assert issubclass(SingleFileError, ValueError)


@pytest.mark.parametrize(
    ("family", "config", "detail"),
    [
        (
            "sd1",
            "sdxl",
            "is the tiny SDXL test model; the checkpoint is the tiny embedded test model. Use a "
            "diffusers folder of the tiny embedded test model for its configs.",
        ),
        (
            "flux-dev",
            "flux-schnell",
            "is the tiny FLUX.1 test model (schnell); the checkpoint is the tiny FLUX.1 test "
            "model (dev).",
        ),
    ],
)
def test_a_config_folder_of_another_family_is_refused(
    family: Family, config: Family, detail: str, family_model_dir: FamilyModelDir, tmp_path: Path
) -> None:
    path = write_checkpoint(family, tmp_path / "model.safetensors")
    with pytest.raises(ConfigFolderError) as refused:
        load_single_file(path, family_model_dir(config))
    assert detail in str(refused.value)


def test_the_tiny_flux_is_refused_with_the_reason(
    family_model_dir: FamilyModelDir, tmp_path: Path
) -> None:
    path = write_checkpoint("flux-dev", tmp_path / "flux.safetensors")
    with pytest.raises(SingleFileError, match=r"only at FLUX\.1's own width \(3072\)"):
        load_single_file(path, family_model_dir("flux-dev"))


def test_a_component_missing_from_the_file_is_never_taken_from_the_config_folder(
    family_model_dir: FamilyModelDir, tmp_path: Path
) -> None:
    """The config folder has a VAE with weights; the file has none. Loading must fail rather
    than build the pipeline with the config model's VAE."""
    path = write_checkpoint("sd1", tmp_path / "no-vae.safetensors", without={"vae"})
    info = detect_checkpoint(read_header(path).tensors, path.name)
    assert info.missing == ("the VAE",)
    with pytest.raises(SingleFileError, match=r"'no-vae\.safetensors' cannot be loaded: Failed to"):
        load_single_file(path, family_model_dir("sd1"), info=info)


def test_the_config_folder_family_is_read_from_its_configs(
    family_model_dir: FamilyModelDir,
) -> None:
    assert config_folder_family(family_model_dir("sd2")) == (F.TINY_SD2, None)
    assert config_folder_family(family_model_dir("flux-schnell")) == (F.TINY_FLUX, "schnell")
    assert config_folder_family(family_model_dir("sd3")) == (F.TINY_SD3, None)
    assert pipeline_class(F.TINY_SDXL).__name__ == "StableDiffusionXLPipeline"
    with pytest.raises(SingleFileError):
        pipeline_class(F.UNKNOWN)
