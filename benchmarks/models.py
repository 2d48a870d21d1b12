"""The benchmarked models and the LoRA set applied to them.

Builds the SD 1.5-sized pipeline (Stable Diffusion 1.5's real UNet, text-encoder and VAE
configs with seeded random weights; nothing is downloaded) and, from
:mod:`benchmarks.sdxl_model`, the SDXL-sized one, each into a versioned cache folder; prepares
a model's folder, loads it into a ``PipelineManager`` in the model's dtype for the device
(:class:`ModelSpec`) and writes the five test LoRAs. Used by :mod:`benchmarks.lora_speed`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTokenizer

from app.config import Settings
from app.cores.lora_engine import LoRACache, LoRARequest
from app.cores.model_manager.embedded_model import (
    EMBEDDED_MODEL_FOLDER,
    build_embedded_model,
    write_tokenizer,
)
from app.cores.model_manager.pipeline_manager import PipelineManager
from benchmarks.sdxl_model import (
    SDXL_FOLDER,
    SDXL_MAX_SHARD,
    SDXL_SAVE_DTYPE,
    SDXL_VERSION,
    clip_l_text_encoder,
    sdxl_pipeline,
)
from tests.factories.lora_files import LoRAFileFormat, write_lora

LORA_COUNT = 5
LORA_RANK = 32
LORA_WEIGHT = 0.5

SD15_FOLDER = "bench--sd15-shaped"
# Bump when the architecture or seeds change, so that old folders are rebuilt.
SD15_VERSION = "1"
_VERSION_FILE = "bench_model_version.txt"


# ---------------------------------------------------------------------------------------------
# Models


def _sd15_pipeline(tokenizer_dir: Path) -> Any:
    """SD 1.5's UNet, text encoder and VAE configs with seeded random weights (fp32)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text_encoder = clip_l_text_encoder()  # same config and seed as before: same weights
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd15_model(model_dir: Path) -> float | None:
    """Build the SD 1.5-sized model into ``model_dir`` unless a current build is there.

    Returns the seconds the build took, or None if the folder was reused. Saved in fp16 (about
    2 GB).
    """
    return build_versioned(model_dir, SD15_VERSION, _sd15_pipeline, torch.float16)


def build_sdxl_model(model_dir: Path) -> float | None:
    """Build the SDXL-sized model (:mod:`benchmarks.sdxl_model`) into ``model_dir`` unless a
    current build is there; saved in fp16 (about 7 GB, shards of at most 2 GB)."""
    return build_versioned(
        model_dir, SDXL_VERSION, sdxl_pipeline, SDXL_SAVE_DTYPE, max_shard_size=SDXL_MAX_SHARD
    )


def build_versioned(
    model_dir: Path,
    version: str,
    make_pipeline: Callable[[Path], Any],
    dtype: torch.dtype,
    max_shard_size: str | None = None,
) -> float | None:
    """Build ``make_pipeline(tokenizer_dir)`` into ``model_dir`` in ``dtype`` unless the folder
    holds a build of ``version``; the seconds it took, or None if the folder was reused.

    Built in a scratch folder beside ``model_dir`` and renamed, so a crash leaves either no
    folder or a complete one.
    """
    marker = model_dir / _VERSION_FILE
    if marker.is_file() and marker.read_text().strip() == version:
        return None
    started = time.perf_counter()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".build-") as scratch:
        tokenizer_dir = Path(scratch) / "tokenizer-source"
        write_tokenizer(tokenizer_dir)
        build_dir = Path(scratch) / "model"
        pipeline = make_pipeline(tokenizer_dir)
        pipeline.to(dtype)
        pipeline.save_pretrained(
            str(build_dir), safe_serialization=True, max_shard_size=max_shard_size
        )
        del pipeline
        (build_dir / _VERSION_FILE).write_text(version + "\n")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        build_dir.rename(model_dir)
    return time.perf_counter() - started


_FP32_FP16 = {"cpu": torch.float32, "cuda": torch.float16}
_SD15_COMPONENTS = ("unet", "text_encoder")


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: where it lives, how to build it, and per-device sizes."""

    key: str
    label: str
    folder: str
    default_repeats: int
    step_px: dict[str, int]
    """Image size of the timed UNet step, per device type."""
    dtypes: dict[str, torch.dtype] = field(default_factory=lambda: dict(_FP32_FP16))
    """The weights' dtype, per device type (fp32 where the type is not listed)."""
    build: Callable[[Path], float | None] | None = None
    """Builds the model's folder (None: the app's embedded model)."""
    lora_components: tuple[str, ...] = _SD15_COMPONENTS
    """What the five LoRAs touch, and what the naive path activates them on."""
    max_cycles: int | None = None
    """At most this many apply/generate/remove cycles, whatever ``--cycles`` asks."""

    def dtype(self, device: torch.device) -> torch.dtype:
        return self.dtypes.get(device.type, torch.float32)


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        "tiny", "tiny (embedded)", EMBEDDED_MODEL_FOLDER, 20, {"cpu": 64, "cuda": 64}
    ),
    "sd15": ModelSpec(
        "sd15", "SD1.5-sized", SD15_FOLDER, 5, {"cpu": 64, "cuda": 512}, build=build_sd15_model
    ),
    # bf16 on the CPU: half the bytes of fp32 and, on CPUs with AMX-BF16 (Sapphire Rapids and
    # later), about 3x the matmul rate; 2.6 G + 0.8 G parameters in fp32 would not leave room
    # for the backups and a naive path's adapters on a small machine.
    "sdxl": ModelSpec(
        "sdxl",
        "SDXL-sized",
        SDXL_FOLDER,
        3,
        {"cpu": 64, "cuda": 1024},
        dtypes={"cpu": torch.bfloat16, "cuda": torch.float16},
        build=build_sdxl_model,
        lora_components=("unet", "text_encoder", "text_encoder_2"),
        max_cycles=10,
    ),
}


def prepare_model(spec: ModelSpec, cache_dir: Path) -> tuple[Path, float | None]:
    """The model's folder, built if needed, and the build time (None if it was reused)."""
    model_dir = cache_dir / "models" / spec.folder
    if spec.build is None:
        started = time.perf_counter()
        reused = (model_dir / "model_index.json").is_file()
        build_embedded_model(model_dir)
        return model_dir, None if reused else time.perf_counter() - started
    return model_dir, spec.build(model_dir)


def new_lora_cache() -> LoRACache:
    """A LoRACache with the app's default limits."""
    fields = Settings.model_fields
    return LoRACache(
        max_count=fields["lora_cache_max_count"].default,
        max_bytes=fields["lora_cache_max_bytes"].default,
    )


def load_manager(spec: ModelSpec, model_dir: Path, device: torch.device) -> PipelineManager:
    """The model loaded onto ``device`` in the spec's dtype for that device."""
    return PipelineManager.load(
        spec.key,
        str(model_dir),
        device,
        spec.dtype(device),
        progress=lambda _step, _phase, _message: None,
        should_stop=lambda: False,
        lora_cache=new_lora_cache(),
    )


def write_lora_set(
    pipeline: Any,
    folder: Path,
    model_key: str,
    components: Sequence[str] = _SD15_COMPONENTS,
) -> list[LoRARequest]:
    """Five rank-32 LoRAs for ``components`` (by default the UNet and the text encoder):
    Kohya, PEFT, Kohya, PEFT, Kohya."""
    requests = []
    for index in range(1, LORA_COUNT + 1):
        fmt: LoRAFileFormat = "kohya" if index % 2 else "peft"
        path = write_lora(
            folder / f"bench_{index}_{fmt}.safetensors",
            pipeline,
            fmt=fmt,
            components=tuple(components),
            rank=LORA_RANK,
            seed=index,
        )
        requests.append(
            LoRARequest(
                id=index,
                name=path.name,
                path=path,
                content_key=f"{model_key}:{index}",
                weight=LORA_WEIGHT,
            )
        )
    return requests


def weight_bytes(pipeline: Any) -> int:
    """Bytes of the parameters and buffers of the UNet, text encoder(s) and VAE."""
    total = 0
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module: torch.nn.Module | None = getattr(pipeline, name, None)
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            total += tensor.numel() * tensor.element_size()
    return total
