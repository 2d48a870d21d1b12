"""Which files a download takes: the pipeline's, one weight variant per component, stored
under plain names (a sharded index rewritten to match)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelInfo

from app.config import Settings
from app.exceptions import BadRequestError
from app.features.hub.file_plan import parse_model_index, plain_index, plan_files
from app.features.hub.hub_client import parse_model_info
from tests.fake_remote import FakeRemote
from tests.harness import running_app

INDEX = json.dumps(
    {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
).encode()


POINTER = {"pointerSize": 134}


def info_with(*files: tuple[str, int]) -> ModelInfo:
    siblings = [
        {
            "rfilename": name,
            "size": size,
            "lfs": {"size": size, "sha256": "0" * 64, "pointerSize": 134},
        }
        if name.endswith(".safetensors")
        else {"rfilename": name, "size": size}
        for name, size in [("model_index.json", 100), *files]
    ]
    return parse_model_info({"id": "org/sharded", "sha": "c" * 40, "siblings": siblings})


SHARDED = (
    ("unet/config.json", 10),
    ("unet/diffusion_pytorch_model.safetensors.index.json", 20),
    ("unet/diffusion_pytorch_model-00001-of-00002.safetensors", 4000),
    ("unet/diffusion_pytorch_model-00002-of-00002.safetensors", 4000),
    ("unet/diffusion_pytorch_model.safetensors.index.fp16.json", 20),
    ("unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors", 2000),
    ("unet/diffusion_pytorch_model-00002-of-00002.fp16.safetensors", 2000),
    ("unet/diffusion_pytorch_model.non_ema.safetensors", 8000),
    ("unet/diffusion_pytorch_model.bin", 8000),
    ("unet/flax_model.msgpack", 8000),
    ("unet/README.md", 5),
    ("unet/onnx/model.onnx", 8000),
    ("v1-5-pruned.safetensors", 9000),
    ("text_encoder/model.safetensors", 50),  # not in model_index: not fetched
)


def test_float16_takes_the_fp16_shards_under_plain_names() -> None:
    plan = plan_files(info_with(*SHARDED), parse_model_index(INDEX, "org/sharded"), want_fp16=True)
    assert {f.remote_name: f.local_name for f in plan.files} == {
        "model_index.json": "model_index.json",
        "unet/config.json": "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json": (
            "unet/diffusion_pytorch_model.safetensors.index.json"
        ),
        "unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors": (
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors"
        ),
        "unet/diffusion_pytorch_model-00002-of-00002.fp16.safetensors": (
            "unet/diffusion_pytorch_model-00002-of-00002.safetensors"
        ),
    }
    assert plan.total_bytes == 100 + 10 + 20 + 2000 + 2000
    assert plan.revision == "c" * 40
    index = {"weight_map": {"a.weight": "diffusion_pytorch_model-00001-of-00002.fp16.safetensors"}}
    rewritten = json.loads(plain_index(json.dumps(index).encode(), "fp16"))
    assert rewritten == {
        "weight_map": {"a.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}
    }


def test_float32_takes_the_plain_weights() -> None:
    plan = plan_files(info_with(*SHARDED), parse_model_index(INDEX, "org/sharded"), want_fp16=False)
    assert sorted(f.remote_name for f in plan.files) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]
    assert all(f.local_name == f.remote_name for f in plan.files)


def test_a_component_with_only_fp16_weights_takes_them_in_float32() -> None:
    files = (("unet/config.json", 10), ("unet/diffusion_pytorch_model.fp16.safetensors", 10))
    plan = plan_files(info_with(*files), parse_model_index(INDEX, "org/x"), want_fp16=False)
    weights = [f for f in plan.files if f.remote_name.endswith(".safetensors")]
    assert [f.local_name for f in weights] == ["unet/diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize("index", [b"not json", b"[]", b'{"_class_name": "X"}'])
def test_a_model_index_without_components_is_refused(index: bytes) -> None:
    with pytest.raises(BadRequestError, match="names no pipeline components"):
        parse_model_index(index, "org/x")


async def test_a_float16_device_downloads_the_fp16_variant(
    settings: Settings, remote: FakeRemote, sd15_repo_dir: Path
) -> None:
    """``LOCALAI_DEVICE=cuda``: the model will run in float16, so the fp16 files come (half
    the bytes), stored under the plain names; the folder loads as an ordinary pipeline."""
    repo = remote.hub_repo("test-org/tiny-sd15", sd15_repo_dir)
    on_cuda = settings.model_copy(update={"device": "cuda"})
    async with running_app(on_cuda) as (_app, client):
        response = await client.post("/downloads", json={"model_id": "test-org/tiny-sd15"})
        assert response.status_code == 200, response.text
    weights = [name for name in repo.fetched_files() if name.endswith(".safetensors")]
    assert weights
    assert all(".fp16." in name for name in weights)
    folder = Path(response.json()["path"])
    unet = "unet/diffusion_pytorch_model.safetensors"
    fp16_unet = "unet/diffusion_pytorch_model.fp16.safetensors"
    assert (folder / unet).read_bytes() == repo.files[fp16_unet].served.data
    assert not list(folder.rglob("*.fp16.*"))
    pipeline = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    weight = next(pipeline.unet.parameters()).detach()
    assert torch.equal(weight, weight.half().float())  # half-precision values: the fp16 file
