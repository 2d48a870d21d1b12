"""HTTP for downloads (LoRA files, model repositories): redirects (bounded, http/https only,
the token kept to its site), retries with exponential backoff, and messages a user
understands for every failure."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from app.exceptions import BadRequestError
from app.features.loras.downloads.references import check_url

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({502, 503, 504})
MAX_REDIRECTS = 5
MAX_JSON_BYTES = 8 * 1024 * 1024
MAX_RETRY_DELAY = 30.0
RETRYABLE_ERRORS = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)


class DownloadError(Exception):
    """A download cannot go on; ``detail`` says why, for the user. ``status`` and
    ``error_code`` (Hugging Face's ``X-Error-Code``) are the remote answer that caused it,
    when one did: callers that answer a request choose their own status from them."""

    def __init__(
        self, detail: str, *, status: int | None = None, error_code: str | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.error_code = error_code


class RetryableStatus(Exception):
    """A passing server error (502/503/504): try again like after a dropped connection."""

    def __init__(self, error: DownloadError) -> None:
        super().__init__(error.detail)
        self.error = error


@dataclass(frozen=True)
class Target:
    """What is fetched, for messages and for the token."""

    what: str
    service: str | None = None
    token: str | None = field(default=None, repr=False)

    def server(self, url: str) -> str:
        return self.service or f"The server {urlsplit(url).hostname}"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    delay: float

    async def wait(self, failures: int) -> None:
        """Back off before try ``failures + 1``: delay, 2 x delay, 4 x delay... (capped)."""
        await asyncio.sleep(min(self.delay * 2 ** (failures - 1), MAX_RETRY_DELAY))


def _same_site(a: str, b: str) -> bool:
    first, second = urlsplit(a), urlsplit(b)
    return (first.scheme, first.netloc) == (second.scheme, second.netloc)


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, url: str, target: Target, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.Response]:
    """GET ``url`` with its body unread, after at most ``MAX_REDIRECTS`` redirects. The token
    goes only to the site first asked (a CDN or storage link never sees it)."""
    current = url
    with_token = bool(target.token)
    for _ in range(MAX_REDIRECTS + 1):
        sent = dict(headers or {})
        with_token = with_token and _same_site(current, url)  # once it left, never again
        if with_token:
            sent["Authorization"] = f"Bearer {target.token}"
        response = await client.send(
            client.build_request("GET", current, headers=sent), stream=True
        )
        if response.status_code not in REDIRECT_STATUSES:
            try:
                yield response
            finally:
                await response.aclose()
            return
        await response.aclose()
        location = response.headers.get("location")
        if not location:
            raise DownloadError(f"{target.server(current)} sent a redirect without a target.")
        current = urljoin(current, location)
        try:
            check_url(current)
        except BadRequestError as error:
            raise DownloadError(f"Redirected to an unusable URL: {error.detail}") from None
    raise DownloadError(
        f"Too many redirects while downloading {target.what} (more than {MAX_REDIRECTS})."
    )


_HF_ERROR_CODES = {
    # Hugging Face names the reason in X-Error-Code (401 also means "no such repository").
    "RepoNotFound": "the repository does not exist, or is private (a token is needed)",
    "RevisionNotFound": "that revision does not exist",
    "EntryNotFound": "the repository has no such file",
    "GatedRepo": "the repository is gated: accept its conditions on the site, then use a token",
}


def status_error(
    status: int, target: Target, url: str, error_code: str | None = None
) -> DownloadError:
    """The failure an HTTP status means, worded for the user."""
    message = _status_message(status, target, url, error_code)
    return DownloadError(message, status=status, error_code=error_code)


def _status_message(status: int, target: Target, url: str, error_code: str | None) -> str:
    server = target.server(url)
    what = target.what
    if error_code in _HF_ERROR_CODES:
        where = f"on {target.service}" if target.service else f"at {server}"
        return f"Not available {where}: {what} ({_HF_ERROR_CODES[error_code]}; HTTP {status})."
    if status == 404:
        if target.service:
            return f"Not found on {target.service}: {what}"
        return f"Not found: {what} (HTTP 404)"
    if status == 401:
        if target.token:
            return (
                f"{server} refused the token for {what} (HTTP 401): check that it is valid "
                "and not expired."
            )
        return f"{what} needs an access token (HTTP 401 from {server}): add a token to the request."
    if status == 403:
        if target.token:
            return (
                f"{server} refused access to {what} with this token (HTTP 403): the token "
                "lacks permission, or the model is gated (accept its terms on the site first)."
            )
        return (
            f"{server} refused access to {what} (HTTP 403): it needs an access token that "
            "has permission."
        )
    if status == 429:
        return f"{server} is limiting requests (HTTP 429); try again later."
    if status >= 500:
        return f"{server} failed (HTTP {status}) for {what}; try again later."
    return f"{server} answered HTTP {status} for {what}."


def check_status(response: httpx.Response, target: Target, ok: frozenset[int]) -> None:
    status = response.status_code
    if status in ok:
        return
    error = status_error(status, target, str(response.url), response.headers.get("x-error-code"))
    if status in RETRY_STATUSES:
        raise RetryableStatus(error)
    raise error


def _root_cause(error: BaseException) -> BaseException:
    """The innermost cause (httpx wraps the socket error, anyio wraps it again)."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error


def _reason(error: Exception) -> str:
    cause = _root_cause(error)
    if isinstance(cause, socket.gaierror):
        return "the host name could not be resolved (no network, or a wrong address)"
    if isinstance(cause, ConnectionRefusedError):
        return "the connection was refused (nothing answers at that address)"
    if isinstance(cause, ConnectionResetError):
        return "the connection was reset"
    return str(error) or str(cause) or type(error).__name__


def network_error(error: Exception, url: str, tries: int) -> DownloadError:
    host = urlsplit(url).hostname
    after = f" (tried {tries} times)" if tries > 1 else ""
    if isinstance(error, RetryableStatus):
        inner = error.error
        return DownloadError(f"{inner.detail}{after}", status=inner.status)
    if isinstance(error, httpx.ConnectError):
        return DownloadError(
            f"Could not connect to {host}: {_reason(error)}{after}. Check the network connection."
        )
    if isinstance(error, httpx.TimeoutException):
        return DownloadError(f"{host} did not answer in time{after}.")
    return DownloadError(f"The connection to {host} broke off{after}: {_reason(error)}.")


def lookup_timed_out(service: str, seconds: float) -> str:
    return (
        f"{service} did not answer within {seconds:g} s (LOCALAI_LOOKUP_TIMEOUT); try again later."
    )


async def get_json(client: httpx.AsyncClient, url: str, target: Target, retry: RetryPolicy) -> Any:
    """The JSON document at ``url``, retrying connection errors."""
    failures = 0
    while True:
        try:
            async with open_stream(client, url, target, {"Accept": "application/json"}) as answer:
                check_status(answer, target, frozenset({200}))
                body = bytearray()
                async for chunk in answer.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JSON_BYTES:
                        raise DownloadError(f"{target.server(url)} sent too large an answer.")
            break
        except (*RETRYABLE_ERRORS, RetryableStatus) as error:
            failures += 1
            if failures >= retry.attempts:
                raise network_error(error, url, failures) from None
            await retry.wait(failures)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise DownloadError(
            f"{target.server(url)} sent an answer that is not JSON for {target.what}."
        ) from None
