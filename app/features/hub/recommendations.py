"""The first-run carousel: a curated catalogue of models, and the section and model that suit
this machine.

The catalogue is data (``catalogue.json`` beside this file), validated once at import: a
broken catalogue is a bug in the release, so the backend refuses to start and names the fault
instead of serving a page with holes. Its figures mean:

- ``memory_requirement_gb``: GiB of GPU memory to generate one image at the model's native
  size in float16, weights included, with room for the CUDA context and the VAE's decode
  (SDXL's VAE decodes in float32); whole GiB, rounded up.
- ``model_size``: what a CUDA machine downloads (``file_plan``): the fp16 weight files where
  the repository has them, fp32 where it has none, safety checker included where the
  pipeline has one. Without CUDA the fp32 files are fetched, up to twice as much.

The default choice, ``recommend``:

1. The memory to fit in is the user's share of the device the backend generates on, the same
   device a model load picks (``LOCALAI_DEVICE``, else the UI's ``device_index``, else the
   primary GPU): that GPU's total memory times ``gpu_scale_factor``. Without a CUDA GPU
   (CPU, or Apple MPS) it is the total RAM times ``ram_scale_factor``.
2. On a CUDA GPU: the first section, most capable first, with an ``is_recommended`` model
   whose ``memory_requirement_gb`` fits; that model is ``default_selected_id``.
3. Without one: ``lightweight`` always, since SDXL and SD 1.5 take minutes per image there;
   its first ``is_recommended`` model whose float32 needs (twice the float16 figure: the
   backend runs float32 off CUDA) fit.
4. When nothing fits: ``lightweight`` and its smallest model (the first of equals).

The chosen section is the one marked ``is_recommended``; the catalogue leaves that flag out.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from app.config import Settings
from app.cores.model_manager.device import resolve_device
from app.cores.model_manager.memory import GiB
from app.features.config.schemas import UserConfig
from app.features.config.service import read_user_config
from app.features.hardware.service import list_gpus, total_ram
from app.features.hub.schemas import (
    SECTION_ORDER,
    Recommendations,
    RecommendationSection,
    RecommendedModel,
    SectionId,
)
from app.platform.storage import Storage

CATALOGUE_FILE = Path(__file__).with_name("catalogue.json")
FLOAT32_FACTOR = 2
"""Off CUDA the backend computes in float32: twice the memory of the float16 figures."""


class Catalogue(BaseModel):
    """The curated sections, checked beyond their types: all three, in order, each with a
    recommended model, and no repository listed twice."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sections: list[RecommendationSection]

    @model_validator(mode="after")
    def _check(self) -> Catalogue:
        ids = tuple(section.id for section in self.sections)
        if ids != SECTION_ORDER:
            raise ValueError(f"the sections must be {SECTION_ORDER} in this order, not {ids}")
        for section in self.sections:
            if "is_recommended" in section.model_fields_set:
                raise ValueError(
                    f"section {section.id!r} sets is_recommended, which is chosen per machine"
                )
            if not any(model.is_recommended for model in section.models):
                raise ValueError(f"section {section.id!r} has no recommended model")
        repos = [model.id for section in self.sections for model in section.models]
        if len(set(repos)) != len(repos):
            raise ValueError("a repository is listed more than once")
        return self

    def section(self, section_id: SectionId) -> RecommendationSection:
        return self.sections[SECTION_ORDER.index(section_id)]


def parse_catalogue(text: str | bytes) -> Catalogue:
    """The catalogue from its JSON text; raises ``pydantic.ValidationError`` naming the fault."""
    return Catalogue.model_validate_json(text)


CATALOGUE = parse_catalogue(CATALOGUE_FILE.read_bytes())


def _first_fitting(
    section: RecommendationSection, available_gib: float, factor: int = 1
) -> RecommendedModel | None:
    return next(
        (
            model
            for model in section.models
            if model.is_recommended and model.memory_requirement_gb * factor <= available_gib
        ),
        None,
    )


def _choose(
    catalogue: Catalogue, gpu_memory_bytes: int | None, ram_bytes: int, user: UserConfig
) -> tuple[RecommendationSection, RecommendedModel]:
    lightweight = catalogue.section("lightweight")
    if gpu_memory_bytes:
        available = gpu_memory_bytes * user.gpu_scale_factor / GiB
        for section in catalogue.sections:
            if model := _first_fitting(section, available):
                return section, model
    else:
        available = ram_bytes * user.ram_scale_factor / GiB
        if model := _first_fitting(lightweight, available, FLOAT32_FACTOR):
            return lightweight, model
    return lightweight, min(lightweight.models, key=lambda model: model.memory_requirement_gb)


def recommend(
    catalogue: Catalogue, gpu_memory_bytes: int | None, ram_bytes: int, user: UserConfig
) -> Recommendations:
    """The carousel for a machine with ``gpu_memory_bytes`` on its generating CUDA GPU (None:
    no CUDA GPU) and ``ram_bytes`` of RAM, under the user's memory shares (module docstring)."""
    chosen, model = _choose(catalogue, gpu_memory_bytes, ram_bytes, user)
    sections = [
        section.model_copy(update={"is_recommended": section.id == chosen.id})
        for section in catalogue.sections
    ]
    return Recommendations(
        sections=sections, default_section=chosen.id, default_selected_id=model.id
    )


def _generating_gpu_memory(settings: Settings, user: UserConfig) -> int | None:
    """Total memory of the CUDA GPU a model load would use; None when it would not use one."""
    device = resolve_device(settings.device, user.device_index)
    gpus = list_gpus()
    if device.type != "cuda" or not gpus:
        return None
    index = device.index if device.index is not None and device.index < len(gpus) else 0
    return gpus[index].memory


def machine_recommendations(storage: Storage, settings: Settings) -> Recommendations:
    """The carousel for this machine and the user's settings (blocks: CUDA, files)."""
    user = read_user_config(storage)
    return recommend(CATALOGUE, _generating_gpu_memory(settings, user), total_ram(), user)
