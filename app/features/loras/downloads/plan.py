"""From a reference to what to fetch: the first URL, the file name, who to blame in messages,
and what is known in advance (CivitAI: the sha256 and the model-version data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from app.config import Settings
from app.features.loras.downloads import civitai
from app.features.loras.downloads.references import (
    CivitAIRef,
    HuggingFaceRef,
    Reference,
    URLRef,
    public_url,
)
from app.features.loras.downloads.schemas import DownloadSource
from app.platform.remote_files import RetryPolicy, Target

HUGGING_FACE = "Hugging Face"


@dataclass(frozen=True)
class Plan:
    source: DownloadSource
    url: str
    public_url: str
    file_name: str
    target: Target
    name_from_response: bool = False
    """A plain URL: a Content-Disposition file name beats the one guessed from the path."""
    expected_sha256: str | None = None
    civitai: dict[str, Any] | None = None
    trained_words: list[str] = field(default_factory=list)


def source_of(reference: Reference) -> DownloadSource:
    if isinstance(reference, HuggingFaceRef):
        return DownloadSource.HUGGINGFACE
    if isinstance(reference, CivitAIRef):
        return DownloadSource.CIVITAI
    return DownloadSource.URL


def describe(reference: Reference, settings: Settings) -> tuple[str, str]:
    """(public URL, file name) before anything is fetched."""
    if isinstance(reference, HuggingFaceRef):
        return reference.url(settings.huggingface_base_url), reference.file_name
    if isinstance(reference, CivitAIRef):
        base = settings.civitai_base_url
        if reference.version_id is None:
            return f"{base}/models/{reference.model_id}", f"model {reference.model_id}"
        return (
            f"{base}/api/download/models/{reference.version_id}",
            f"model version {reference.version_id}",
        )
    return public_url(reference.url), reference.file_name


async def resolve(
    reference: Reference,
    token: str | None,
    settings: Settings,
    client: httpx.AsyncClient,
    retry: RetryPolicy,
) -> Plan:
    """The plan; for CivitAI this asks its API (remote failures raise ``DownloadError``)."""
    if isinstance(reference, URLRef):
        shown = public_url(reference.url)
        return Plan(
            DownloadSource.URL,
            reference.url,
            shown,
            reference.file_name,
            Target(shown, None, token),
            name_from_response=True,
        )
    if isinstance(reference, HuggingFaceRef):
        url = reference.url(settings.huggingface_base_url)
        what = f"{reference.repo_id}/{reference.filename}"
        if reference.revision != "main":
            what += f" (revision {reference.revision})"
        return Plan(
            DownloadSource.HUGGINGFACE,
            url,
            url,
            reference.file_name,
            Target(what, HUGGING_FACE, token),
        )
    base = settings.civitai_base_url
    file = await civitai.resolve(client, base, reference, token, retry)
    model_id = file.data.get("model_id") or reference.model_id
    page = f"{base}/models/{model_id}?modelVersionId={file.version_id}" if model_id else None
    return Plan(
        DownloadSource.CIVITAI,
        file.download_url,
        page or public_url(file.download_url),
        file.file_name,
        Target(f"'{file.file_name}' (model version {file.version_id})", civitai.SERVICE, token),
        expected_sha256=file.sha256,
        civitai=file.data,
        trained_words=file.trained_words,
    )
