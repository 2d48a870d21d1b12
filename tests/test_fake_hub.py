"""The fake Hub answers like huggingface.co: the real ``huggingface_hub`` client reads its
model info, searches it and downloads from it; the offline repos it serves really run."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from tests.fake_hub import HubRepo
from tests.fake_remote import FakeRemote, running_remote

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def remote(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRemote]:
    # The app sets HF_HUB_OFFLINE for itself; these tests talk to loopback on purpose.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with running_remote() as fake:
        yield fake


@pytest.fixture
def repo(remote: FakeRemote, sd15_repo_dir: Path) -> HubRepo:
    return remote.hub_repo("tiny/sd15", sd15_repo_dir, likes=7)


def api(remote: FakeRemote) -> HfApi:
    return HfApi(endpoint=remote.url("/hub"), token=False)


def test_model_info_lists_every_file_with_sizes_and_lfs(
    remote: FakeRemote, repo: HubRepo, sd15_repo_dir: Path
) -> None:
    info = api(remote).model_info("tiny/sd15", files_metadata=True)

    assert info.sha == repo.commit
    assert not info.gated
    assert info.library_name == "diffusers"
    siblings = {s.rfilename: s for s in info.siblings or []}
    unet = sd15_repo_dir / UNET
    assert siblings[UNET].size == unet.stat().st_size
    lfs = siblings[UNET].lfs
    assert lfs is not None
    assert lfs.size == unet.stat().st_size
    assert siblings["model_index.json"].lfs is None
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in siblings
    decoys = {"sd15.safetensors", "unet/diffusion_pytorch_model.bin", "README.md"}
    assert decoys | {"text_encoder/pytorch_model.bin", ".gitattributes"} <= set(siblings)
    assert (siblings["sd15.safetensors"].size or 0) >= 20 * 2**20
    assert set(repo.decoys) >= decoys


def test_search_filters_sorts_and_limits(remote: FakeRemote, repo: HubRepo) -> None:
    remote.hub_search_entry("famous/sd-model", likes=900, downloads=5)
    remote.hub_search_entry("other/llm", likes=50, tags=("transformers",), pipeline_tag=None)

    found = api(remote).list_models(search="SD", sort="likes", limit=5)
    assert [(m.id, m.likes) for m in found] == [("famous/sd-model", 900), ("tiny/sd15", 7)]
    found = api(remote).list_models(filter="diffusers", pipeline_tag="text-to-image", limit=1)
    assert [m.id for m in found] == ["tiny/sd15"]
    assert [m.id for m in api(remote).list_models(author="other")] == ["other/llm"]
    (expanded,) = api(remote).list_models(search="tiny", expand=["sha", "likes"])
    assert (expanded.sha, expanded.likes, expanded.downloads) == (repo.commit, 7, None)


def test_files_download_at_resolve_and_through_the_cdn(
    remote: FakeRemote, repo: HubRepo, sd15_repo_dir: Path, tmp_path: Path
) -> None:
    for name in ("model_index.json", UNET):
        path = hf_hub_download(
            "tiny/sd15", name, endpoint=remote.url("/hub"), cache_dir=tmp_path, token=False
        )
        assert Path(path).read_bytes() == (sd15_repo_dir / name).read_bytes()
        assert f"/snapshots/{repo.commit}/" in path

    assert repo.fetched_files() == ["model_index.json", UNET]
    heads = [r for r in remote.requests if r.method == "HEAD"]
    assert len(heads) >= 2  # metadata first, as the client always does


def test_gated_repo_needs_its_token_for_files_not_for_info(
    remote: FakeRemote, sd15_repo_dir: Path, tmp_path: Path
) -> None:
    remote.hub_repo("corp/gated", sd15_repo_dir, gated_token="hf_secret", decoys=False)
    assert api(remote).model_info("corp/gated").gated == "auto"

    def fetch(token: str | bool) -> str:
        endpoint = remote.url("/hub")
        return hf_hub_download(
            "corp/gated", "model_index.json", endpoint=endpoint, cache_dir=tmp_path, token=token
        )

    with pytest.raises(GatedRepoError):
        fetch(False)
    with pytest.raises(GatedRepoError):
        fetch("hf_wrong")
    assert (
        Path(fetch("hf_secret")).read_bytes() == (sd15_repo_dir / "model_index.json").read_bytes()
    )


def test_unknown_repo_is_not_found(remote: FakeRemote, tmp_path: Path) -> None:
    remote.hub_search_entry("only/listed")
    with pytest.raises(RepositoryNotFoundError):
        api(remote).model_info("only/listed")
    endpoint = remote.url("/hub")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("no/such", "x.json", endpoint=endpoint, cache_dir=tmp_path, token=False)


def test_head_ranges_and_a_file_cut_mid_way(remote: FakeRemote, repo: HubRepo) -> None:
    data = repo.files[UNET].served.data
    repo.configure(UNET, drop_after=1000)
    repo.configure("model_index.json", hold=threading.Event())  # never released
    with httpx.Client(follow_redirects=True) as client:
        assert client.head(repo.url("model_index.json")).status_code == 200  # not held
        head = client.head(repo.url(UNET, repo.commit))
        assert head.headers["content-length"] == str(len(data))
        assert head.headers["etag"] == f'"{repo.files[UNET].sha256}"'
        assert head.headers["x-repo-commit"] == repo.commit
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(repo.url(UNET))
        rest = client.get(repo.url(UNET), headers={"Range": "bytes=1000-"})
        assert rest.status_code == 206
        assert rest.content == data[1000:]
        redirect = client.head(repo.url(UNET), follow_redirects=False)
    assert redirect.status_code == 302
    assert redirect.headers["x-linked-size"] == str(len(data))
    assert repo.fetched_files() == [UNET]


def _image(pipeline: Any) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    result = pipeline(
        "a boat", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    )
    image: np.ndarray = result.images[0]
    return image


def test_sdxl_repo_generates(sdxl_repo_dir: Path) -> None:
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(sdxl_repo_dir), local_files_only=True)
    image = _image(pipeline)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    assert (sdxl_repo_dir / "unet/diffusion_pytorch_model.fp16.safetensors").is_file()


def test_sd15_repo_draws_other_images_than_the_embedded_model(
    sd15_repo_dir: Path, tiny_pipeline: StableDiffusionPipeline
) -> None:
    repo = StableDiffusionPipeline.from_pretrained(str(sd15_repo_dir), local_files_only=True)
    assert np.abs(_image(repo) - _image(tiny_pipeline)).mean() > 0.01
