"""CivitAI: a model version's primary .safetensors file, its hashes and trained words.

Documented answers used: ``GET /api/v1/model-versions/{id}`` -> ``{id, name, baseModel,
trainedWords, model: {name, type}, files: [{name, sizeKB, type, primary, hashes: {SHA256,
AutoV2, ...}, downloadUrl, metadata: {format}}]}``; ``GET /api/v1/models/{id}`` ->
``{id, name, type, modelVersions: [newest first]}``. Everything in them is untrusted text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx

from app.cores.lora_files.metadata import MAX_TITLE_CHARS, MAX_WORD_CHARS, clean_text
from app.exceptions import BadRequestError
from app.features.loras.downloads.references import CivitAIRef, check_url
from app.platform.remote_files import DownloadError, RetryPolicy, Target, get_json

SERVICE = "CivitAI"
LORA_TYPES = frozenset({"lora", "locon", "dora", "lycoris"})
MAX_TRAINED_WORDS = 32
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_PICKLE_NOTE = (
    "pickle files (.pt, .ckpt) are not accepted, because they can run arbitrary code when loaded"
)


@dataclass(frozen=True)
class CivitAIFile:
    version_id: int
    file_name: str
    download_url: str
    sha256: str | None
    trained_words: list[str]
    data: dict[str, Any]
    """What the LoRA's row keeps (``civitai`` column)."""


def _text(value: object, limit: int = MAX_TITLE_CHARS) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return clean_text(value.strip(), limit)[0]


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _is_safetensors(file: dict[str, Any]) -> bool:
    name = _text(file.get("name")) or ""
    file_format = _dict(file.get("metadata")).get("format")
    return name.lower().endswith(".safetensors") or file_format == "SafeTensor"


def _choose_file(version: dict[str, Any], what: str) -> dict[str, Any]:
    files = [f for f in version.get("files") or [] if isinstance(f, dict)]
    models = [f for f in files if f.get("type") in (None, "Model")] or files
    if not models:
        raise DownloadError(f"{SERVICE} lists no file for {what}.")
    usable = sorted(
        (f for f in models if _is_safetensors(f)), key=lambda f: f.get("primary") is not True
    )
    if not usable:
        names = ", ".join(f"'{_text(f.get('name'))}'" for f in models)
        raise DownloadError(
            f"{what} on {SERVICE} has no .safetensors file ({names}): {_PICKLE_NOTE}."
        )
    return usable[0]


def _trained_words(version: dict[str, Any]) -> list[str]:
    words: list[str] = []
    raw_words = version.get("trainedWords")
    for raw in raw_words if isinstance(raw_words, list) else []:
        word = _text(raw, MAX_WORD_CHARS)
        if word and word not in words:
            words.append(word)
    return words[:MAX_TRAINED_WORDS]


def _sha256(hashes: dict[str, Any]) -> str | None:
    for key, value in hashes.items():
        if key.lower() == "sha256" and isinstance(value, str) and _SHA256.match(value):
            return value.lower()
    return None


def _download_url(file: dict[str, Any], base_url: str, version_id: int) -> str:
    url = file.get("downloadUrl")
    if isinstance(url, str):
        try:
            check_url(url)
            return url
        except BadRequestError:
            pass
    return f"{base_url}/api/download/models/{version_id}"


def describe_version(version: Any, version_id: int, base_url: str) -> CivitAIFile:
    what = f"model version {version_id}"
    if not isinstance(version, dict):
        raise DownloadError(f"{SERVICE} sent an unreadable description of {what}.")
    model = _dict(version.get("model"))
    model_type = _text(model.get("type"))
    if model_type and model_type.lower() not in LORA_TYPES:
        name = _text(model.get("name")) or what
        raise DownloadError(f"'{name}' ({what}) on {SERVICE} is a {model_type}, not a LoRA.")
    file = _choose_file(version, what)
    hashes = {
        str(key): text
        for key, value in _dict(file.get("hashes")).items()
        if (text := _text(value, 128))
    }
    file_name = _text(file.get("name")) or f"civitai-{version_id}.safetensors"
    trained_words = _trained_words(version)
    model_id = version.get("modelId")
    data = {
        "model_id": model_id if isinstance(model_id, int) else None,
        "model_name": _text(model.get("name")),
        "model_type": model_type,
        "version_id": version_id,
        "version_name": _text(version.get("name")),
        "base_model": _text(version.get("baseModel")),
        "trained_words": trained_words,
        "file_name": file_name,
        "hashes": hashes,
    }
    return CivitAIFile(
        version_id=version_id,
        file_name=file_name,
        download_url=_download_url(file, base_url, version_id),
        sha256=_sha256(hashes),
        trained_words=trained_words,
        data=data,
    )


async def resolve(
    client: httpx.AsyncClient,
    base_url: str,
    ref: CivitAIRef,
    token: str | None,
    retry: RetryPolicy,
) -> CivitAIFile:
    version_id = ref.version_id
    if version_id is None:
        assert ref.model_id is not None
        target = Target(f"model {ref.model_id}", SERVICE, token)
        model = await get_json(client, f"{base_url}/api/v1/models/{ref.model_id}", target, retry)
        versions = _dict(model).get("modelVersions") or []
        latest = _dict(versions[0]) if isinstance(versions, list) and versions else {}
        if not isinstance(latest.get("id"), int):
            raise DownloadError(f"Model {ref.model_id} on {SERVICE} has no version to download.")
        version_id = int(latest["id"])
    target = Target(f"model version {version_id}", SERVICE, token)
    url = f"{base_url}/api/v1/model-versions/{version_id}"
    version = await get_json(client, url, target, retry)
    return describe_version(version, version_id, base_url)
