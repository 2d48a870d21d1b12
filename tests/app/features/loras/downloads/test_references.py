"""Reading what the user asked for, and wording network failures (no network, no app)."""

from __future__ import annotations

import socket

import httpx
import pytest

from app.config import Settings
from app.exceptions import BadRequestError
from app.features.loras.downloads.references import (
    CivitAIRef,
    HuggingFaceRef,
    URLRef,
    parse_request,
    public_url,
)
from app.features.loras.downloads.schemas import LoRADownloadRequest
from app.features.loras.downloads.transfer import _disposition_name
from app.platform.remote_files import Target, network_error, status_error

DEFAULTS = Settings()


def parse(url: str, settings: Settings = DEFAULTS) -> object:
    return parse_request(LoRADownloadRequest(url=url), settings)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://huggingface.co/owner/repo/blob/main/lora.safetensors",
            HuggingFaceRef("owner/repo", "lora.safetensors", "main"),
        ),
        (
            "https://www.huggingface.co/owner/repo/resolve/refs%2Fpr%2F3/sub/dir/my%20lora.safetensors?download=true",
            HuggingFaceRef("owner/repo", "sub/dir/my lora.safetensors", "refs/pr/3"),
        ),
        ("https://civitai.com/models/123/some-slug?modelVersionId=456", CivitAIRef(456, 123)),
        ("https://civitai.com/models/123", CivitAIRef(None, 123)),
        ("http://civitai.com/api/download/models/456?type=Model&token=t", CivitAIRef(456)),
        (
            "https://example.com/files/a%20b.safetensors?x=1",
            URLRef("https://example.com/files/a%20b.safetensors?x=1", "a b.safetensors"),
        ),
        (
            "https://huggingface.co:8443/owner/repo",
            URLRef("https://huggingface.co:8443/owner/repo", "repo"),
        ),
    ],
)
def test_urls_are_routed(url: str, expected: object) -> None:
    assert parse(url) == expected


def test_configured_bases_with_a_path() -> None:
    settings = Settings(
        huggingface_base_url="http://127.0.0.1:9000/mirror/",
        civitai_base_url="http://127.0.0.1:9000/civ",
    )
    assert settings.huggingface_base_url == "http://127.0.0.1:9000/mirror"
    assert parse(
        "http://127.0.0.1:9000/mirror/o/r/blob/v1/x.safetensors", settings
    ) == HuggingFaceRef("o/r", "x.safetensors", "v1")
    assert parse("http://127.0.0.1:9000/civ/models/7", settings) == CivitAIRef(None, 7)
    assert isinstance(parse("http://127.0.0.1:9001/civ/models/7", settings), URLRef)


def test_bad_base_url_setting() -> None:
    with pytest.raises(ValueError, match="http"):
        Settings(civitai_base_url="ftp://civitai.com")


def test_public_url_drops_credentials() -> None:
    assert (
        public_url("https://user:pw@civitai.com/api/download/models/1?type=Model&token=abc&Token=x")
        == "https://civitai.com/api/download/models/1?type=Model"
    )


def test_pickle_url_is_refused() -> None:
    with pytest.raises(BadRequestError, match="pickle"):
        parse("https://example.com/x/model.ckpt")


def test_network_errors_in_words() -> None:
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as cause:
            raise OSError("All connection attempts failed") from cause
    except OSError as wrapped:
        error = httpx.ConnectError("All connection attempts failed")
        error.__cause__ = wrapped
    detail = network_error(error, "https://civitai.com/api", 4).detail
    assert detail == (
        "Could not connect to civitai.com: the host name could not be resolved (no network, "
        "or a wrong address) (tried 4 times). Check the network connection."
    )
    timeout = network_error(httpx.ReadTimeout("read"), "https://huggingface.co/x", 1).detail
    assert timeout == "huggingface.co did not answer in time."


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ('attachment; filename="a b.safetensors"', "a b.safetensors"),
        ("attachment; filename*=UTF-8''%C3%A9t%C3%A9.safetensors", "été.safetensors"),
        ('attachment; filename="../../etc/x.safetensors"', "x.safetensors"),
        ("inline", None),
    ],
)
def test_content_disposition(header: str, name: str | None) -> None:
    response = httpx.Response(200, headers={"content-disposition": header})
    assert _disposition_name(response) == name


@pytest.mark.parametrize(
    ("status", "code", "fragment"),
    [
        (401, "RepoNotFound", "does not exist, or is private"),
        (403, "GatedRepo", "gated"),
        (404, "RevisionNotFound", "revision does not exist"),
        (404, None, "not found on hugging face: o/r/x.safetensors"),
    ],
)
def test_hugging_face_error_codes(status: int, code: str | None, fragment: str) -> None:
    target = Target("o/r/x.safetensors", "Hugging Face")
    detail = status_error(status, target, "https://huggingface.co/o/r", code).detail
    assert fragment in detail.lower()
