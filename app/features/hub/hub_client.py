"""The Hugging Face Hub's model API, through our own HTTP client.

``huggingface_hub`` parses the answers (``ModelInfo``) and spells the file URLs
(``hf_hub_url``); the requests themselves go through :mod:`app.platform.remote_files`, which
bounds time and size, retries dropped connections, keeps a token to its site and words every
failure for the user (huggingface_hub's own calls block a thread with their own timeouts
and cannot be cancelled).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from huggingface_hub import ModelInfo, hf_hub_url

from app.config import Settings
from app.exceptions import (
    AppError,
    BadGatewayError,
    ForbiddenError,
    NotFoundError,
    TooManyRequestsError,
    UnauthorizedError,
)
from app.features.hub.schemas import SearchSort
from app.features.loras.downloads.references import check_token
from app.platform.remote_files import (
    DownloadError,
    RetryPolicy,
    Target,
    get_json,
    lookup_timed_out,
)

HUGGING_FACE = "Hugging Face"
USER_AGENT = "localai-backend (model downloads)"
_SORT_FIELDS: dict[SearchSort, str] = {
    "likes": "likes",
    "downloads": "downloads",
    "trending": "trendingScore",
    "created": "createdAt",
    "modified": "lastModified",
}


def hub_error(error: DownloadError) -> AppError:
    """The request's answer for a failed Hub call: the remote's reason, our status."""
    if error.error_code in ("RepoNotFound", "RevisionNotFound", "EntryNotFound"):
        return NotFoundError(error.detail)
    if error.error_code == "GatedRepo" or error.status == 401:
        return UnauthorizedError(error.detail)
    if error.status == 404:
        return NotFoundError(error.detail)
    if error.status == 403:
        return ForbiddenError(error.detail)
    if error.status == 429:
        return TooManyRequestsError(error.detail)
    return BadGatewayError(error.detail)  # the Hub failed, or the network is down


def parse_model_info(document: dict[str, Any]) -> ModelInfo:
    """huggingface_hub's parser (it knows every field's spelling across API versions); an
    answer it cannot read is the Hub's fault (502), not ours."""
    try:
        return ModelInfo(**document)  # type: ignore[no-untyped-call]  # kwargs-only, untyped
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        shown = str(document.get("id", "a model"))[:200]
        raise BadGatewayError(
            f"{HUGGING_FACE} sent model information that cannot be read for {shown} ({error!r})."
        ) from None


class HubClient:
    """One per app (created in the lifespan): a connection pool to the Hub."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.huggingface_base_url
        self._default_token = settings.huggingface_token
        self.retry = RetryPolicy(
            settings.lora_download_attempts, settings.lora_download_retry_delay
        )
        self.lookup_timeout = settings.lookup_timeout
        timeout = httpx.Timeout(settings.lookup_timeout)
        self.http = httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, headers={"User-Agent": USER_AGENT}
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    def token(self, given: str | None) -> str | None:
        """The request's token, else ``LOCALAI_HUGGINGFACE_TOKEN``."""
        if given:
            check_token(given)
            return given
        return self._default_token.get_secret_value() if self._default_token else None

    def target(self, repo_id: str, token: str | None, what: str | None = None) -> Target:
        return Target(what or f"the model {repo_id}", HUGGING_FACE, token)

    async def model_info_json(
        self, repo_id: str, token: str | None, revision: str | None = None
    ) -> dict[str, Any]:
        """The Hub's model info with file sizes (``blobs=true``), as sent."""
        path = f"/api/models/{repo_id}"
        if revision:
            path += f"/revision/{quote(revision, safe='')}"
        url = f"{self.base_url}{path}?blobs=true"
        answer = await self._get_json(url, self.target(repo_id, token))
        if not isinstance(answer, dict) or answer.get("id") in (None, ""):
            raise BadGatewayError(f"{HUGGING_FACE} sent an unexpected answer for {repo_id}.")
        return answer

    async def model_info(
        self, repo_id: str, token: str | None, revision: str | None = None
    ) -> ModelInfo:
        return parse_model_info(await self.model_info_json(repo_id, token, revision))

    async def search(
        self, text: str | None, tag: str | None, sort: SearchSort, limit: int
    ) -> list[ModelInfo]:
        """Text-to-image diffusers models, best first by ``sort``."""
        query: list[tuple[str, str]] = [
            ("pipeline_tag", "text-to-image"),
            ("library", "diffusers"),
            ("sort", _SORT_FIELDS[sort]),
            ("direction", "-1"),
            ("limit", str(limit)),
        ]
        if text:
            query.append(("search", text))
        if tag:
            query.append(("filter", tag))
        url = f"{self.base_url}/api/models?{urlencode(query)}"
        answer = await self._get_json(
            url, Target("the model search", HUGGING_FACE, self.token(None))
        )
        if not isinstance(answer, list):
            raise BadGatewayError(f"{HUGGING_FACE} sent an unexpected answer to the search.")
        return [
            parse_model_info(entry) for entry in answer if isinstance(entry, dict) and "id" in entry
        ]

    async def _get_json(self, url: str, target: Target) -> Any:
        """One API answer, within ``LOCALAI_LOOKUP_TIMEOUT`` in all (a server that trickles
        its answer would pass every per-read timeout)."""
        try:
            async with asyncio.timeout(self.lookup_timeout):
                return await get_json(self.http, url, target, self.retry)
        except DownloadError as error:
            raise hub_error(error) from None
        except TimeoutError:
            raise BadGatewayError(lookup_timed_out(HUGGING_FACE, self.lookup_timeout)) from None

    def file_url(self, repo_id: str, revision: str, filename: str) -> str:
        return hf_hub_url(repo_id, filename, revision=revision, endpoint=self.base_url)
