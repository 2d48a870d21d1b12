"""What a LoRA's metadata claims about its family, and the verdict with the shapes.

The shapes decide (``base_model``); the metadata's claim (``modelspec.architecture``,
``ss_base_model_version``, ``ss_v2``, the training model's name) only chooses among the
families the shapes leave open, and is reported when it disagrees.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from app.cores.lora_files.base_model import Detection, detect_base_model
from app.cores.lora_files.safetensors_file import SafetensorsHeader
from app.cores.model_manager.model_family import ModelFamily

F = ModelFamily


@dataclass(frozen=True)
class MetadataClaim:
    family: ModelFamily
    key: str
    value: str


@dataclass(frozen=True)
class BaseModelVerdict:
    family: ModelFamily
    evidence: str
    claim: MetadataClaim | None

    @property
    def conflict(self) -> bool:
        """The metadata names a known family other than the one the shapes show."""
        claim = self.claim
        if claim is None:
            return False
        return self.family.known and claim.family not in (self.family, F.UNKNOWN)


# ---------------------------------------------------------------------------------------------
# What the metadata claims


def _family_from_label(label: str) -> ModelFamily:
    """``modelspec.architecture`` / ``ss_base_model_version`` values (sd-scripts' names)."""
    value = label.strip().lower()
    if "flux" in value:
        return F.FLUX
    if "stable-diffusion-xl" in value or value.startswith("sdxl"):
        return F.SDXL
    if "stable-diffusion-3" in value or value.startswith("sd3"):
        return F.SD3
    if "stable-diffusion-v2" in value or value.startswith(("sd_v2", "sd2", "sd_2")):
        return F.SD2
    if "stable-diffusion-v1" in value or value.startswith(("sd_v1", "sd1", "sd_1")):
        return F.SD1
    return F.UNKNOWN


_MODEL_NAME_HINTS = (
    (re.compile(r"flux"), F.FLUX),
    (re.compile(r"xl|pony|illustrious"), F.SDXL),
    (re.compile(r"sd3|sd_3|stable-diffusion-3|sd3\.5"), F.SD3),
    (re.compile(r"v2-|v2_|sd2|sd_2|768-v|2[-._]1"), F.SD2),
    (re.compile(r"v1-|v1_|sd15|sd_15|sd1|1[-._]5|sd-v1"), F.SD1),
)


def metadata_claim(metadata: Mapping[str, str]) -> MetadataClaim | None:
    """The family the metadata names, strongest field first; None when it names none."""
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = metadata.get(key, "").strip()
        if value:
            return MetadataClaim(_family_from_label(value), key, value[:200])
    if metadata.get("ss_v2", "").strip() == "True":
        return MetadataClaim(F.SD2, "ss_v2", "True")
    name = metadata.get("ss_sd_model_name", "").strip()
    lowered = name.lower()
    for pattern, family in _MODEL_NAME_HINTS:
        if pattern.search(lowered):
            return MetadataClaim(family, "ss_sd_model_name", name[:200])
    return None


def resolve_base_model(detection: Detection, claim: MetadataClaim | None) -> BaseModelVerdict:
    """The shapes decide; the metadata only chooses among the families they leave open."""
    if detection.family.known or claim is None or claim.family not in detection.candidates:
        return BaseModelVerdict(detection.family, detection.evidence, claim)
    evidence = f"{detection.evidence}; chosen by its metadata ({claim.key}: {claim.value})"
    return BaseModelVerdict(claim.family, evidence, claim)


def base_model_of(header: SafetensorsHeader) -> BaseModelVerdict:
    return resolve_base_model(detect_base_model(header), metadata_claim(header.metadata))


def conflict_note(base: BaseModelVerdict) -> str | None:
    """A sentence for the UI when the metadata and the shapes disagree."""
    claim = base.claim
    if claim is None or not base.conflict:
        return None
    return (
        f"The file's metadata ({claim.key}: {claim.value}) says {claim.family.display_name}, "
        f"but its layers are shaped for {base.family.display_name}."
    )
