"""Every sampler, built from the embedded model's scheduler config, runs the real pipeline."""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
import torch

from app.features.generators.samplers import Sampler, list_samplers, make_scheduler
from tests.contract import SAMPLER_VALUES

_Decorated = TypeVar("_Decorated", bound=Callable[..., None])

EXPECTED_NAMES = [
    "Euler A",
    "KDPM2 A",
    "Euler",
    "DDIM",
    "LMS",
    "PNDM",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 1M (singlestep)",
    "DPM++ SDE",
    "DPM++ SDE Karras",
    "DDPM",
    "UniPC",
    "DEIS",
    "KDPM2",
    "Heun",
    "LCM",
    "TCD",
]
EXPECTED_CLASSES = {
    Sampler.EULER_A: "EulerAncestralDiscreteScheduler",
    Sampler.KDPM2_A: "KDPM2AncestralDiscreteScheduler",
    Sampler.EULER: "EulerDiscreteScheduler",
    Sampler.DDIM: "DDIMScheduler",
    Sampler.LMS: "LMSDiscreteScheduler",
    Sampler.PNDM: "PNDMScheduler",
    Sampler.DPM_SOLVER_MULTISTEP: "DPMSolverMultistepScheduler",
    Sampler.DPM_SOLVER_MULTISTEP_KARRAS: "DPMSolverMultistepScheduler",
    Sampler.DPM_SOLVER_SINGLESTEP: "DPMSolverSinglestepScheduler",
    Sampler.DPM_SOLVER_SDE: "DPMSolverSDEScheduler",
    Sampler.DPM_SOLVER_SDE_KARRAS: "DPMSolverSDEScheduler",
    Sampler.DDPMS: "DDPMScheduler",
    Sampler.UniPC: "UniPCMultistepScheduler",
    Sampler.DEIS: "DEISMultistepScheduler",
    Sampler.KDPM2: "KDPM2DiscreteScheduler",
    Sampler.HEUN: "HeunDiscreteScheduler",
    Sampler.LCM: "LCMScheduler",
    Sampler.TCD: "TCDScheduler",
}
KARRAS_PAIRS = [
    (Sampler.DPM_SOLVER_MULTISTEP_KARRAS, Sampler.DPM_SOLVER_MULTISTEP),
    (Sampler.DPM_SOLVER_SDE_KARRAS, Sampler.DPM_SOLVER_SDE),
]
# Warnings that come from the libraries themselves, whatever the scheduler settings:
# torch's Tensor.__array__ and __array_wrap__ predate numpy 2's signatures (diffusers hands
# tensors to numpy in set_timesteps, and KDPM2/DEIS also in step), and torchsde complains
# when float rounding puts a query a hair below its interval's start (it clamps and goes on).
UPSTREAM_WARNINGS = [
    (DeprecationWarning, r"__array__ implementation doesn't accept a copy keyword"),
    (DeprecationWarning, r"__array_wrap__ must accept context and return_scalar"),
    (UserWarning, r"Should have ta>=t0 but got"),
]


def _ignore_upstream_warnings(test: _Decorated) -> _Decorated:
    """For tests that do not check warnings themselves: keep the known ones out of the report."""
    for category, pattern in UPSTREAM_WARNINGS:
        test = pytest.mark.filterwarnings(f"ignore:{pattern}:{category.__name__}")(test)
    return test


def _generate(pipeline: Any, seed: int = 0, steps: int = 5) -> npt.NDArray[np.float32]:
    output: Any = pipeline(
        "a red cube",
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    image: npt.NDArray[np.float32] = output.images[0]
    return image


@pytest.fixture
def diffusers_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture diffusers' own log warnings, which do not reach the root logger."""
    library_logger = logging.getLogger("diffusers")
    library_logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="diffusers")
    yield caplog
    library_logger.removeHandler(caplog.handler)


def test_enum_values_in_order() -> None:
    assert [sampler.value for sampler in Sampler] == SAMPLER_VALUES
    assert Sampler.UniPC == "UniPC"


def test_list_samplers_names_and_values() -> None:
    infos = list_samplers()
    assert [info.value for info in infos] == list(Sampler)
    assert [info.name for info in infos] == EXPECTED_NAMES
    assert all(info.description.endswith(".") for info in infos)


@pytest.mark.parametrize("sampler", list(Sampler))
def test_every_sampler_generates_an_image(
    sampler: Sampler,
    tiny_pipeline: Any,
    diffusers_warnings: pytest.LogCaptureFixture,
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_pipeline.scheduler = make_scheduler(sampler, tiny_pipeline.scheduler.config)
        image = _generate(tiny_pipeline)

    assert type(tiny_pipeline.scheduler).__name__ == EXPECTED_CLASSES[sampler]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.01
    unexpected = [
        str(warning.message)
        for warning in caught
        if not any(
            issubclass(warning.category, category) and re.search(pattern, str(warning.message))
            for category, pattern in UPSTREAM_WARNINGS
        )
    ]
    assert unexpected == []
    # Config mismatches and self-corrections (e.g. DPM singlestep's lower_order_final) are
    # logged, not warned: a sampler that needs them is missing an override.
    assert diffusers_warnings.records == []


@pytest.mark.parametrize(("karras", "plain"), KARRAS_PAIRS)
def test_karras_variants_use_karras_sigmas(
    karras: Sampler, plain: Sampler, tiny_pipeline: Any
) -> None:
    base = tiny_pipeline.scheduler.config
    karras_scheduler: Any = make_scheduler(karras, base)
    plain_scheduler: Any = make_scheduler(plain, base)
    assert karras_scheduler.config.use_karras_sigmas is True
    assert plain_scheduler.config.use_karras_sigmas is False
    karras_scheduler.set_timesteps(5)
    plain_scheduler.set_timesteps(5)
    assert karras_scheduler.sigmas.shape == plain_scheduler.sigmas.shape
    assert not torch.allclose(karras_scheduler.sigmas, plain_scheduler.sigmas)


@pytest.mark.parametrize(
    ("sampler", "key", "value"),
    [
        # Clipping the predicted sample to [-1, 1] is for pixel-space models, not SD latents.
        (Sampler.DDIM, "clip_sample", False),
        (Sampler.DDPMS, "clip_sample", False),
        # PLMS as SD runs it, without the Runge-Kutta warm-up steps.
        (Sampler.PNDM, "skip_prk_steps", True),
        (Sampler.DPM_SOLVER_SINGLESTEP, "lower_order_final", True),
        (Sampler.DPM_SOLVER_MULTISTEP, "algorithm_type", "dpmsolver++"),
    ],
)
def test_stable_diffusion_overrides(
    sampler: Sampler, key: str, value: object, tiny_pipeline: Any
) -> None:
    scheduler: Any = make_scheduler(sampler, tiny_pipeline.scheduler.config)
    assert scheduler.config[key] == value


def test_plain_variant_overrides_karras_in_the_model_config(
    tiny_pipeline: Any,
) -> None:
    base = {**tiny_pipeline.scheduler.config, "use_karras_sigmas": True}
    scheduler: Any = make_scheduler(Sampler.DPM_SOLVER_MULTISTEP, base)
    assert scheduler.config.use_karras_sigmas is False


@_ignore_upstream_warnings
def test_base_config_is_not_changed(tiny_pipeline: Any) -> None:
    frozen = tiny_pipeline.scheduler.config
    frozen_before = dict(frozen)
    plain = dict(frozen)
    plain_before = copy.deepcopy(plain)
    for sampler in Sampler:
        make_scheduler(sampler, frozen, noise_seed=1)
        make_scheduler(sampler, plain, noise_seed=[1, 2])
    assert dict(frozen) == frozen_before
    assert plain == plain_before
    assert type(tiny_pipeline.scheduler).__name__ == "EulerAncestralDiscreteScheduler"


@pytest.mark.parametrize("sampler", [Sampler.EULER, Sampler.EULER_A])
def test_same_seed_gives_same_pixels(sampler: Sampler, tiny_pipeline: Any) -> None:
    tiny_pipeline.scheduler = make_scheduler(sampler, tiny_pipeline.scheduler.config)
    first = _generate(tiny_pipeline, seed=3)
    second = _generate(tiny_pipeline, seed=3)
    other = _generate(tiny_pipeline, seed=4)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


@_ignore_upstream_warnings
def test_sde_noise_follows_noise_seed(tiny_pipeline: Any) -> None:
    base = tiny_pipeline.scheduler.config
    images = []
    for noise_seed in (7, 7, 8):
        tiny_pipeline.scheduler = make_scheduler(
            Sampler.DPM_SOLVER_SDE, base, noise_seed=noise_seed
        )
        images.append(_generate(tiny_pipeline))
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


def test_noise_seed_is_ignored_by_other_samplers(tiny_pipeline: Any) -> None:
    scheduler: Any = make_scheduler(Sampler.EULER_A, tiny_pipeline.scheduler.config, noise_seed=7)
    assert "noise_sampler_seed" not in scheduler.config
