"""A small threaded HTTP server on loopback that answers like the services LoRAs come from.

* Files (``serve``): with or without Content-Length, a lying Content-Length, with or without
  ``Range`` support, dropping the connection mid-file (once or every time), streaming slowly
  or without end, held until the test releases it, behind a token.
* Hugging Face (``hugging_face``): ``/hf/{repo_id}/resolve/{revision}/{filename}`` answers
  302 to a "CDN" path (or to another server), like huggingface.co does.
* CivitAI (``civitai_version``, ``civitai_model``): ``/civitai/api/v1/model-versions/{id}``
  and ``/civitai/api/v1/models/{id}`` with the documented JSON shapes, and
  ``/civitai/api/download/models/{id}`` redirecting to a storage path.
* The Hugging Face Hub (``hub_repo``, ``hub_search_entry``) under ``/hub``: model info,
  model search and whole diffusers repositories (see ``tests/fake_hub.py``).

GET and HEAD are answered (HEAD: the same headers, no body, never held or cut). Every
request is recorded (method, path with query, headers) for the tests to inspect.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.fake_civitai import civitai_version_document

if TYPE_CHECKING:
    from tests.fake_hub import HubListing, HubRepo


@dataclass
class Served:
    data: bytes
    content_length: bool | int = True
    """True: the real length; False: omitted (the body ends when the connection closes);
    an int: that number is declared whatever the body is."""
    ranges: bool = True
    drop_after: int | None = None
    """Send this many bytes of the first full answer, then cut the connection (once)."""
    drop_always: bool = False
    """Cut every answer (resumed ones too) after ``drop_after`` bytes, not only the first."""
    chunk: int = 16 * 1024
    delay: float = 0.0
    """Seconds to wait before each chunk."""
    endless: bool = False
    """Send ``data`` over and over: the body never ends (use with ``content_length=False``)."""
    hold: threading.Event | None = None
    """Answer only once this is set (the test decides when, however slow the machine)."""
    hold_after: int | None = None
    """With ``hold``: send this many bytes of a full answer at once, and only the rest once
    ``hold`` is set (the transfer is then certainly under way, and not finished)."""
    disposition: str | None = None
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Answer:
    """A route's answer: a small body, or a file (``served``) with its Range handling."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    served: Served | None = None

    @classmethod
    def json(
        cls, document: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Answer:
        content = {"Content-Type": "application/json"} | dict(headers or {})
        return cls(status, json.dumps(document).encode(), content)


@dataclass
class FakeRemote:
    base_url: str = ""
    files: dict[str, Served] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    documents: dict[str, Any] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    """path -> the token it needs (401 without one, 403 with another)."""
    requests: list[Recorded] = field(default_factory=list)
    hub: dict[str, HubListing] = field(default_factory=dict)
    """repo id -> what the fake Hub knows of it (a ``HubRepo`` when it has files)."""
    stopping: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"{self.base_url}{quote(path, safe='/?=&%')}"

    def serve(self, path: str, data: bytes, **options: Any) -> str:
        self.files[path] = Served(data, **options)
        return self.url(path)

    def requests_to(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if unquote(urlsplit(r.path).path) == path]

    def hugging_face(
        self,
        repo_id: str,
        filename: str,
        data: bytes,
        *,
        revision: str = "main",
        token: str | None = None,
        cdn: FakeRemote | None = None,
        **options: Any,
    ) -> str:
        """The file at its resolve URL, redirecting to a CDN path; returns the resolve URL."""
        resolve = f"/hf/{repo_id}/resolve/{revision}/{filename}"
        cdn_path = f"/cdn/{hashlib.sha256(data).hexdigest()}"
        (cdn or self).serve(cdn_path, data, **options)
        self.redirects[resolve] = (cdn or self).url(cdn_path)
        if token:
            self.tokens[resolve] = token
        return self.url(resolve)

    def civitai_version(
        self,
        version_id: int,
        data: bytes,
        *,
        model_id: int = 1000,
        file_name: str = "civitai_lora.safetensors",
        sha256: str | None = None,
        trained_words: tuple[str, ...] = ("mystyle", "in the style of a boat"),
        model_type: str = "LORA",
        base_model: str = "SD 1.5",
        token: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Model-version JSON (with the file's real sha256 unless told otherwise), the
        download redirect and the stored file; returns the JSON."""
        download = f"/civitai/api/download/models/{version_id}"
        storage = f"/storage/{version_id}/{file_name}"
        document = civitai_version_document(
            version_id,
            data,
            self.url(download),
            model_id=model_id,
            file_name=file_name,
            sha256=sha256,
            trained_words=trained_words,
            model_type=model_type,
            base_model=base_model,
        )
        self.documents[f"/civitai/api/v1/model-versions/{version_id}"] = document
        self.redirects[download] = self.url(storage)
        if token:
            self.tokens[download] = token
        self.serve(storage, data, **options)
        return document

    def hub_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        commit: str | None = None,
        gated_token: str | None = None,
        decoys: bool = True,
        cdn: bool = True,
        likes: int = 0,
        downloads: int = 0,
        **file_options: Any,
    ) -> HubRepo:
        """A Hub repository holding every file under ``folder`` (and, with ``decoys``, what
        a downloader must leave alone); ``file_options`` are ``Served`` options for every
        file, ``HubRepo.configure`` sets them on one."""
        from tests.fake_hub import new_repo  # it builds on this module's types

        repo = new_repo(
            self,
            repo_id,
            folder,
            commit=commit,
            gated_token=gated_token,
            decoys=decoys,
            **file_options,
        )
        repo.cdn, repo.likes, repo.downloads = cdn, likes, downloads
        self.hub[repo_id] = repo
        return repo

    def hub_search_entry(
        self,
        repo_id: str,
        *,
        likes: int = 0,
        downloads: int = 0,
        trending_score: int = 0,
        tags: tuple[str, ...] = ("diffusers", "safetensors", "text-to-image"),
        pipeline_tag: str | None = "text-to-image",
        library_name: str | None = "diffusers",
    ) -> HubListing:
        """A model the search lists but whose info and files the Hub does not have."""
        from tests.fake_hub import HubListing

        entry = HubListing(
            repo_id=repo_id,
            likes=likes,
            downloads=downloads,
            trending_score=trending_score,
            tags=list(tags),
            pipeline_tag=pipeline_tag,
            library_name=library_name,
        )
        self.hub[repo_id] = entry
        return entry

    def civitai_model(self, model_id: int, versions: list[dict[str, Any]]) -> None:
        self.documents[f"/civitai/api/v1/models/{model_id}"] = {
            "id": model_id,
            "name": f"Model {model_id}",
            "type": "LORA",
            "modelVersions": versions,
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._respond()

    def do_HEAD(self) -> None:
        self._respond()

    def _respond(self) -> None:
        from tests.fake_hub import hub_answer  # it builds on this module's types

        remote = self.server.remote
        headers = dict(self.headers.items())
        remote.requests.append(Recorded(self.command, self.path, headers))
        path = unquote(urlsplit(self.path).path)
        answer = hub_answer(remote, self.path, headers)
        if answer is not None:
            self._send(answer)
        elif path in remote.tokens and not self._authorized(remote.tokens[path]):
            return
        elif path in remote.statuses:
            self._small(remote.statuses[path], b'{"error": "as configured"}')
        elif path in remote.redirects:
            self.send_response(302)
            self.send_header("Location", remote.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path in remote.documents:
            self._small(200, json.dumps(remote.documents[path]).encode(), "application/json")
        elif path in remote.files:
            self._file(remote.files[path])
        else:
            self._small(404, b'{"error": "Entry not found"}')

    def _authorized(self, token: str) -> bool:
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        given = given or parse_qs(urlsplit(self.path).query).get("token", [""])[0]
        if given == token:
            return True
        self._small(403 if given else 401, b'{"error": "Invalid credentials"}')
        return False

    def _small(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self._send(Answer(status, body, {"Content-Type": content_type}))

    def _send(self, answer: Answer) -> None:
        if answer.served is not None:
            self._file(answer.served, answer.headers)
            return
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    def _file(self, served: Served, headers: Mapping[str, str] | None = None) -> None:
        head = self.command == "HEAD"
        hold = served.hold if not head else None
        if hold is not None and served.hold_after is None and not self._released(hold):
            return
        data = served.data
        span = _range(self.headers.get("Range", ""), len(data)) if served.ranges else None
        if span is not None:
            start, end = span
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
            start, end = 0, len(data)
        body = data[start:end]
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if served.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", served.content_type)
        if served.disposition:
            self.send_header("Content-Disposition", served.disposition)
        if served.content_length is True:
            self.send_header("Content-Length", str(len(body)))
        elif served.content_length is not False:
            self.send_header("Content-Length", str(served.content_length))
            body = body[: served.content_length]
        if served.content_length is not True:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return
        cut = served.drop_after if start == 0 or served.drop_always else None
        if cut is not None:
            if not served.drop_always:
                served.drop_after = None  # once
            body = body[:cut]
        held_at = served.hold_after if hold is not None and start == 0 else None
        sent = 0
        try:
            for chunk in _chunks(body, served):
                if held_at is not None and sent >= held_at:
                    if hold is None or not self._released(hold):
                        break
                    held_at = None
                if self.server.remote.stopping.wait(served.delay):  # delay 0: no wait
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _released(self, hold: threading.Event) -> bool:
        """Wait for ``hold``; False when the server stops first."""
        stopping = self.server.remote.stopping
        while not hold.wait(0.05):
            if stopping.is_set():
                return False
        return True


def _range(asked: str, size: int) -> tuple[int, int] | None:
    """``bytes=start-`` or ``bytes=start-end`` (inclusive) as a slice; None for anything else."""
    first, dash, last = asked.removeprefix("bytes=").partition("-")
    if not asked.startswith("bytes=") or not dash or not first.isdigit():
        return None
    end = min(int(last) + 1, size) if last.isdigit() else size
    return int(first), end


def _chunks(body: bytes, served: Served) -> Iterator[bytes]:
    while True:
        for offset in range(0, len(body), served.chunk):
            yield body[offset : offset + served.chunk]
        if not served.endless or not body:
            return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    remote: FakeRemote


@contextmanager
def running_remote() -> Iterator[FakeRemote]:
    server = _Server(("127.0.0.1", 0), _Handler)
    remote = FakeRemote()
    server.remote = remote
    remote.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield remote
    finally:
        remote.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url(path: str = "/file.safetensors") -> str:
    """A loopback URL nothing listens on (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
