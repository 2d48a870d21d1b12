"""What the user asked to download, checked without touching the network (400 at once).

A URL on the configured Hugging Face or CivitAI site is routed to that service, so that a
CivitAI download gets its hashes and trained words and every error names the right service.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from app.config import Settings
from app.exceptions import BadRequestError
from app.features.loras import file_manager
from app.features.loras.downloads.schemas import LoRADownloadRequest
from app.validation import control_character_in

ALLOWED_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HF_FILE = re.compile(r"^/([\w.\-]+/[\w.\-]+)/(?:blob|resolve)/([^/]+)/(.+)$")
_CIVITAI_MODEL = re.compile(r"^/models/(\d+)(?:/[^/]*)?/?$")
_CIVITAI_DOWNLOAD = re.compile(r"^/api/(?:download/models|v1/model-versions)/(\d+)/?$")
_SECRET_PARAMETERS = {"token", "access_token", "api_key", "apikey"}


@dataclass(frozen=True)
class URLRef:
    url: str
    file_name: str


@dataclass(frozen=True)
class HuggingFaceRef:
    repo_id: str
    filename: str
    revision: str = "main"

    def url(self, base_url: str) -> str:
        return (
            f"{base_url}/{self.repo_id}/resolve/{quote(self.revision, safe='')}/"
            f"{quote(self.filename)}"
        )

    @property
    def file_name(self) -> str:
        return self.filename.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class CivitAIRef:
    version_id: int | None
    model_id: int | None = None
    """Set alone: the model's latest version."""


Reference = URLRef | HuggingFaceRef | CivitAIRef


def check_url(url: str) -> None:
    """Only absolute http(s) URLs, for the request and for every redirect."""
    found = control_character_in(url)
    if found is not None or " " in url:
        character = "a space" if found is None else f"a control character (U+{ord(found):04X})"
        raise BadRequestError(f"The URL is invalid: it contains {character}.")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"'{scheme}:' URLs" if scheme else "relative URLs"
        raise BadRequestError(f"Only http:// and https:// URLs can be downloaded, not {shown}.")
    if not parts.hostname:
        raise BadRequestError(f"Not a valid URL (no host): {public_url(url)}")


def public_url(url: str) -> str:
    """``url`` without credentials: no user:password, no token query parameters."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = [
        (key, value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
        if key.lower() not in _SECRET_PARAMETERS
    ]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))


def check_token(token: str) -> None:
    """A token goes into an HTTP header: printable ASCII only (never echoed back)."""
    if not all("!" <= character <= "~" for character in token):
        raise BadRequestError(
            "The access token is invalid: tokens are printable ASCII text without spaces; "
            "copy it again from the service's settings page."
        )


def token_in(url: str) -> str | None:
    """A ``?token=`` given in the URL (CivitAI download links carry one)."""
    for key, value in parse_qsl(urlsplit(url).query):
        if key.lower() == "token" and value:
            return value
    return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower().removeprefix("www.")
    return scheme, host, parts.port or _DEFAULT_PORTS.get(scheme)


def _path_under(url: str, base_url: str) -> str | None:
    """The path of ``url`` below ``base_url`` (same site, either scheme), or None."""
    (_, host, port), (_, base_host, base_port) = _origin(url), _origin(base_url)
    defaults = _DEFAULT_PORTS.values()
    if host != base_host or not (port == base_port or (port in defaults and base_port in defaults)):
        return None
    base_path = urlsplit(base_url).path.rstrip("/")
    path = urlsplit(url).path
    if base_path and not (path == base_path or path.startswith(base_path + "/")):
        return None
    return path[len(base_path) :] or "/"


def _hugging_face_from_url(path: str, url: str) -> HuggingFaceRef:
    match = _HF_FILE.match(path)
    if match is None:
        raise BadRequestError(
            f"Not a Hugging Face file URL: {public_url(url)}. Give the file's URL "
            "(https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>), or "
            '{"huggingface": {"repo_id": ..., "filename": ...}}.'
        )
    repo_id, revision, filename = match.groups()
    return _hugging_face(repo_id, unquote(filename), unquote(revision))


def _hugging_face(repo_id: str, filename: str, revision: str | None) -> HuggingFaceRef:
    segments = filename.split("/")
    if filename.startswith("/") or any(part in ("", ".", "..") for part in segments):
        raise BadRequestError(f"Not a file path in a repository: '{filename}'")
    file_manager.check_name(segments[-1])
    return HuggingFaceRef(repo_id, filename, revision or "main")


def _civitai_from_url(path: str, query: str, url: str) -> CivitAIRef:
    if match := _CIVITAI_DOWNLOAD.match(path):
        return CivitAIRef(int(match.group(1)))
    if match := _CIVITAI_MODEL.match(path):
        version = dict(parse_qsl(query)).get("modelVersionId", "")
        if version and not version.isdigit():
            raise BadRequestError(f"Not a CivitAI model version id: '{version}'")
        return CivitAIRef(int(version) if version else None, int(match.group(1)))
    raise BadRequestError(
        f"Cannot find a CivitAI model in {public_url(url)}: expected "
        "https://civitai.com/models/<id> (its latest version) or "
        "https://civitai.com/models/<id>?modelVersionId=<version id>."
    )


def _plain_url(url: str) -> URLRef:
    file_name = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    file_manager.check_name(file_name, pickle_only=True)
    return URLRef(url, file_name or "lora.safetensors")


def parse_request(request: LoRADownloadRequest, settings: Settings) -> Reference:
    if request.huggingface is not None:
        ref = request.huggingface
        return _hugging_face(ref.repo_id, ref.filename, ref.revision)
    if request.civitai is not None:
        return CivitAIRef(request.civitai.model_version_id)
    assert request.url is not None
    url = request.url.strip()
    check_url(url)
    if (path := _path_under(url, settings.huggingface_base_url)) is not None:
        return _hugging_face_from_url(path, url)
    if (path := _path_under(url, settings.civitai_base_url)) is not None:
        return _civitai_from_url(path, urlsplit(url).query, url)
    return _plain_url(url)
