"""The samplers the API offers, and how each one becomes a diffusers scheduler.

A sampler is chosen per request, but the noise schedule it must follow belongs to the model:
its betas, prediction type and timestep spacing live in the loaded pipeline's scheduler
config. So every scheduler is built *from that config*, and a sampler only adds the few
settings that make it the sampler the user picked (Karras sigmas, the DPM-Solver++ variant)
or that Stable Diffusion needs from that scheduler class.

``DPM_SOLVER_SDE*`` need the ``torchsde`` package and ``LMS`` needs ``scipy``; without them
diffusers hands out placeholder classes that raise ``ImportError`` when built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from app.exceptions import BadRequestError


class Sampler(StrEnum):
    """Sampler ids as the API and the database spell them; the order is the one shown to users."""

    EULER_A = "EULER_A"
    KDPM2_A = "KDPM2_A"
    EULER = "EULER"
    DDIM = "DDIM"
    LMS = "LMS"
    PNDM = "PNDM"
    DPM_SOLVER_MULTISTEP = "DPM_SOLVER_MULTISTEP"
    DPM_SOLVER_MULTISTEP_KARRAS = "DPM_SOLVER_MULTISTEP_KARRAS"
    DPM_SOLVER_SINGLESTEP = "DPM_SOLVER_SINGLESTEP"
    DPM_SOLVER_SDE = "DPM_SOLVER_SDE"
    DPM_SOLVER_SDE_KARRAS = "DPM_SOLVER_SDE_KARRAS"
    DDPMS = "DDPMS"
    UniPC = "UniPC"
    DEIS = "DEIS"
    KDPM2 = "KDPM2"
    HEUN = "HEUN"
    LCM = "LCM"
    TCD = "TCD"


@dataclass(frozen=True)
class SamplerInfo:
    """What a client needs to offer a sampler: the A1111-style name users know, and a hint."""

    name: str
    value: Sampler
    description: str


@dataclass(frozen=True)
class _Spec:
    name: str
    description: str
    scheduler_class: type[Any]
    overrides: Mapping[str, Any] = field(default_factory=dict)


def _sigmas(*, karras: bool) -> dict[str, Any]:
    # Explicit on both sides: a model may ship a config with Karras (or exponential) sigmas
    # switched on, and the plain variant must then still differ from the Karras one.
    # Two sigma kinds at once make diffusers raise, so the other kinds are switched off.
    return {"use_karras_sigmas": karras, "use_exponential_sigmas": False, "use_beta_sigmas": False}


# SD latents are not confined to [-1, 1]: clipping the predicted sample there (the default of
# DDIM and DDPM, made for pixel-space models) washes the image out.
_NO_CLIP = {"clip_sample": False}
# SD was trained with this: the last step keeps the real alpha of t=0 instead of pretending 1.
_SD_FINAL_ALPHA = {"set_alpha_to_one": False}
# "DPM++" is the data-prediction solver; a model config may name another algorithm_type.
_DPMPP = {"algorithm_type": "dpmsolver++"}

_SPECS: dict[Sampler, _Spec] = {
    Sampler.EULER_A: _Spec(
        "Euler A",
        "Fast ancestral sampler that adds fresh noise each step; varied, does not converge.",
        EulerAncestralDiscreteScheduler,
    ),
    Sampler.KDPM2_A: _Spec(
        "KDPM2 A",
        "Second-order ancestral sampler: two model calls per step, varied results.",
        KDPM2AncestralDiscreteScheduler,
    ),
    Sampler.EULER: _Spec(
        "Euler",
        "Simple, fast, deterministic first-order sampler; a good default.",
        EulerDiscreteScheduler,
    ),
    Sampler.DDIM: _Spec(
        "DDIM",
        "Classic deterministic sampler from the DDIM paper; stable at 20-50 steps.",
        DDIMScheduler,
        {**_NO_CLIP, **_SD_FINAL_ALPHA},
    ),
    Sampler.LMS: _Spec(
        "LMS",
        "Linear multistep sampler that reuses earlier steps; smooth at moderate step counts.",
        LMSDiscreteScheduler,
    ),
    Sampler.PNDM: _Spec(
        "PNDM",
        "Pseudo linear multistep (PLMS), Stable Diffusion's original default sampler.",
        PNDMScheduler,
        # PLMS as SD uses it: the Runge-Kutta warm-up would add model calls on every step
        # count and buys nothing for latent diffusion.
        {"skip_prk_steps": True, **_SD_FINAL_ALPHA},
    ),
    Sampler.DPM_SOLVER_MULTISTEP: _Spec(
        "DPM++ 2M",
        "Second-order multistep DPM-Solver++; sharp, deterministic results in 20-30 steps.",
        DPMSolverMultistepScheduler,
        {**_DPMPP, "solver_order": 2, **_sigmas(karras=False)},
    ),
    Sampler.DPM_SOLVER_MULTISTEP_KARRAS: _Spec(
        "DPM++ 2M Karras",
        "DPM++ 2M with Karras noise levels; often the best quality at low step counts.",
        DPMSolverMultistepScheduler,
        {**_DPMPP, "solver_order": 2, **_sigmas(karras=True)},
    ),
    Sampler.DPM_SOLVER_SINGLESTEP: _Spec(
        "DPM++ 1M (singlestep)",
        "Singlestep DPM-Solver++: each step is solved on its own, without earlier steps.",
        DPMSolverSinglestepScheduler,
        # Without it, an odd step count makes diffusers log a warning and switch it on anyway.
        {**_DPMPP, "lower_order_final": True},
    ),
    Sampler.DPM_SOLVER_SDE: _Spec(
        "DPM++ SDE",
        "Stochastic DPM-Solver++: two model calls per step, detailed and varied results.",
        DPMSolverSDEScheduler,
        _sigmas(karras=False),
    ),
    Sampler.DPM_SOLVER_SDE_KARRAS: _Spec(
        "DPM++ SDE Karras",
        "DPM++ SDE with Karras noise levels; high quality in few steps, but slow per step.",
        DPMSolverSDEScheduler,
        _sigmas(karras=True),
    ),
    Sampler.DDPMS: _Spec(
        "DDPM",
        "The original denoising diffusion sampler; needs many steps to look clean.",
        DDPMScheduler,
        _NO_CLIP,
    ),
    Sampler.UniPC: _Spec(
        "UniPC",
        "Predictor-corrector multistep sampler; good images in very few (10-20) steps.",
        UniPCMultistepScheduler,
    ),
    Sampler.DEIS: _Spec(
        "DEIS",
        "Exponential-integrator multistep sampler; fast convergence in few steps.",
        DEISMultistepScheduler,
    ),
    Sampler.KDPM2: _Spec(
        "KDPM2",
        "Deterministic second-order sampler (Karras' DPM2): two model calls per step.",
        KDPM2DiscreteScheduler,
    ),
    Sampler.HEUN: _Spec(
        "Heun",
        "Deterministic second-order sampler: more accurate than Euler, twice the model calls.",
        HeunDiscreteScheduler,
    ),
    Sampler.LCM: _Spec(
        "LCM",
        "Latent consistency sampler for LCM-distilled models or LoRAs; 4-8 steps, low CFG.",
        LCMScheduler,
    ),
    Sampler.TCD: _Spec(
        "TCD",
        "Trajectory consistency sampler for TCD-distilled models or LoRAs; 4-8 steps.",
        TCDScheduler,
    ),
}


# Flow-matching models (SD3, FLUX.1) follow a sigma schedule the pipeline computes (FLUX
# shifts it by the image size and passes ``sigmas`` and ``mu``): only flow-match schedulers
# that take both can run them. Each sampler maps to the closest one; the rest are refused.
_FLOW_SPECS: dict[Sampler, _Spec] = {
    Sampler.EULER: _Spec(
        "Euler",
        "Flow-matching Euler, deterministic.",
        FlowMatchEulerDiscreteScheduler,
        {"stochastic_sampling": False, **_sigmas(karras=False)},
    ),
    Sampler.EULER_A: _Spec(
        "Euler A",
        "Flow-matching Euler that re-noises each step (the ancestral variant).",
        FlowMatchEulerDiscreteScheduler,
        {"stochastic_sampling": True, **_sigmas(karras=False)},
    ),
    Sampler.DPM_SOLVER_MULTISTEP_KARRAS: _Spec(
        "DPM++ 2M Karras",
        "Flow-matching Euler on Karras noise levels (the closest a flow model can run).",
        FlowMatchEulerDiscreteScheduler,
        {"stochastic_sampling": False, **_sigmas(karras=True)},
    ),
    Sampler.LCM: _Spec("LCM", "Flow-matching latent consistency sampler.", FlowMatchLCMScheduler),
}


def is_flow_matching(base_config: Mapping[str, Any]) -> bool:
    """Whether the model's own scheduler is a flow-matching one (SD3, FLUX.1)."""
    return str(base_config.get("_class_name", "")).startswith("FlowMatch")


def flow_matching_samplers() -> list[Sampler]:
    return list(_FLOW_SPECS)


def list_samplers() -> list[SamplerInfo]:
    """All samplers in menu order, for the API to list."""
    specs = [(sampler, _SPECS[sampler]) for sampler in Sampler]
    return [
        SamplerInfo(name=spec.name, value=sampler, description=spec.description)
        for sampler, spec in specs
    ]


def make_scheduler(
    sampler: Sampler,
    base_config: Mapping[str, Any],
    *,
    noise_seed: int | Sequence[int] | None = None,
) -> SchedulerMixin:
    """Build a new scheduler for ``sampler`` that follows the model's noise schedule.

    ``base_config`` is the loaded pipeline's ``scheduler.config``; it is copied, never changed,
    so the pipeline's own scheduler can be restored or reused for the next request.

    ``noise_seed`` matters only to the DPM++ SDE samplers: their Brownian noise does not come
    from the pipeline's generator, so without a seed of their own the same request seed would
    give a different image each time. Pass the request seed to make them reproducible, or one
    seed per image (as many as the batch has images) so that each image's noise depends only
    on its own seed, not on the batch it was generated in.
    """
    spec = _flow_spec(sampler) if is_flow_matching(base_config) else _SPECS[sampler]
    overrides = dict(spec.overrides)
    if noise_seed is not None and spec.scheduler_class is DPMSolverSDEScheduler:
        overrides["noise_sampler_seed"] = (
            noise_seed if isinstance(noise_seed, int) else list(noise_seed)
        )
    scheduler: SchedulerMixin = spec.scheduler_class.from_config(dict(base_config), **overrides)
    return scheduler


def _flow_spec(sampler: Sampler) -> _Spec:
    spec = _FLOW_SPECS.get(sampler)
    if spec is None:
        working = ", ".join(f"{_SPECS[s].name} ({s.value})" for s in _FLOW_SPECS)
        raise BadRequestError(
            f"The sampler {_SPECS[sampler].name} ({sampler.value}) cannot run this model: it is "
            f"a flow-matching model (SD3, FLUX.1). Choose one of: {working}."
        )
    return spec
