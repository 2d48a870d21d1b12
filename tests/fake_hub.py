"""The Hugging Face Hub as the fake remote answers it, under ``/hub`` (the endpoint).

Shapes follow the Hub's API and what ``huggingface_hub`` reads from it:

* ``GET /hub/api/models/{repo_id}[/revision/{revision}]``: model info; ``?blobs=true`` adds
  ``size``/``blobId`` to every sibling and ``lfs`` to LFS ones. A gated repo's info is
  readable without a token, as on the Hub; only its files are refused.
* ``GET /hub/api/models?search=&filter=&pipeline_tag=&library=&author=&sort=&limit=``: short
  infos of the registered repos and search-only entries.
* ``HEAD``/``GET /hub/{repo_id}/resolve/{revision}/{path}`` (revision: the commit or
  ``main``): the file with ``ETag``, ``X-Repo-Commit``, Range support; LFS files answer 302
  to ``/cdn/repos/...`` with ``X-Linked-Size``/``X-Linked-Etag`` unless the repo says not.
* Errors carry ``X-Error-Code`` (``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``,
  ``EntryNotFound``) and ``X-Error-Message``, which is what clients branch on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from tests.fake_remote import Answer, Served

if TYPE_CHECKING:
    from tests.fake_remote import FakeRemote

HUB = "/hub"
CDN = "/cdn/repos"
_LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".gguf")
_LFS_MIN_SIZE = 10 * 2**20  # bigger files go to LFS whatever their name
_DECOY_CHECKPOINT_SIZE = 20 * 2**20
_SORT_KEYS = {
    "likes": "likes",
    "downloads": "downloads",
    "trendingScore": "trending_score",
    "createdAt": "created_at",
    "lastModified": "last_modified",
}
Gated = Literal[False, "auto", "manual"]


@dataclass
class HubFile:
    """One repo file. What the Hub advertises (size, sha256, blob id) is fixed when it is
    registered: ``HubRepo.configure(name, data=...)`` then serves other bytes than promised."""

    rfilename: str
    served: Served
    decoy: bool = False
    size: int = field(init=False)
    sha256: str = field(init=False)
    blob_id: str = field(init=False)

    def __post_init__(self) -> None:
        data = self.served.data
        self.size, self.sha256 = len(data), hashlib.sha256(data).hexdigest()
        blob = self.pointer if self.lfs else data  # git stores LFS files as pointers
        self.blob_id = hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()

    @property
    def lfs(self) -> bool:
        return self.rfilename.endswith(_LFS_SUFFIXES) or self.size >= _LFS_MIN_SIZE

    @property
    def pointer(self) -> bytes:
        """The Git LFS pointer file git stores in place of the bytes."""
        lines = ["version https://git-lfs.github.com/spec/v1", f"oid sha256:{self.sha256}"]
        return ("\n".join([*lines, f"size {self.size}"]) + "\n").encode()

    @property
    def etag(self) -> str:
        return f'"{self.sha256 if self.lfs else self.blob_id}"'

    def sibling(self, blobs: bool) -> dict[str, Any]:
        if not blobs:
            return {"rfilename": self.rfilename}
        sibling: dict[str, Any] = {"rfilename": self.rfilename, "size": self.size}
        sibling["blobId"] = self.blob_id
        if self.lfs:
            sibling["lfs"] = {
                "size": self.size,
                "sha256": self.sha256,
                "pointerSize": len(self.pointer),
            }
        return sibling


@dataclass(kw_only=True)
class HubListing:
    """What the model search shows of a repo; search-only entries have nothing more."""

    repo_id: str
    likes: int = 0
    downloads: int = 0
    trending_score: int = 0
    tags: list[str] = field(default_factory=lambda: ["diffusers", "text-to-image"])
    pipeline_tag: str | None = "text-to-image"
    library_name: str | None = "diffusers"
    gated: Gated = False
    created_at: str = "2024-01-01T00:00:00.000Z"
    last_modified: str = "2024-06-01T00:00:00.000Z"

    @property
    def author(self) -> str | None:
        return self.repo_id.split("/")[0] if "/" in self.repo_id else None

    @property
    def mongo_id(self) -> str:
        return hashlib.sha1(self.repo_id.encode()).hexdigest()[:24]

    def short_info(self) -> dict[str, Any]:
        return {
            "_id": self.mongo_id,
            "id": self.repo_id,
            "modelId": self.repo_id,
            "author": self.author,
            "likes": self.likes,
            "downloads": self.downloads,
            "trendingScore": self.trending_score,
            "private": False,
            "tags": list(self.tags),
            "pipeline_tag": self.pipeline_tag,
            "library_name": self.library_name,
            "createdAt": self.created_at,
        }

    def full_info(self) -> dict[str, Any]:
        extra = {"gated": self.gated, "disabled": False, "lastModified": self.last_modified}
        return self.short_info() | extra


@dataclass(kw_only=True)
class HubRepo(HubListing):
    """A registered repository: its files, commit and access rule."""

    remote: FakeRemote = field(repr=False)
    commit: str
    files: dict[str, HubFile] = field(repr=False)
    gated_token: str | None = None
    cdn: bool = True
    """LFS files answer 302 to a CDN path, as on the Hub; False: served at resolve."""

    @property
    def decoys(self) -> list[str]:
        return [f.rfilename for f in self.files.values() if f.decoy]

    def url(self, rfilename: str, revision: str = "main") -> str:
        return self.remote.url(f"{HUB}/{self.repo_id}/resolve/{revision}/{rfilename}")

    def cdn_path(self, rfilename: str) -> str:
        return f"{CDN}/{self.repo_id}/{self.files[rfilename].sha256}/{rfilename}"

    def configure(self, rfilename: str, **options: Any) -> Served:
        """Set ``Served`` options (drop_after, hold, ...) on one file, wherever it is served."""
        served = self.files[rfilename].served
        for name, value in options.items():
            if name not in {f.name for f in dataclasses.fields(Served)}:
                raise TypeError(f"Served has no option {name!r}")
            setattr(served, name, value)
        return served

    def fetched_files(self) -> list[str]:
        """rfilenames whose bytes were asked for with GET (at resolve or on the CDN), in
        first-request order, each once: HEADs and model info are not fetches."""
        resolve, cdn = f"{HUB}/{self.repo_id}/resolve/", f"{CDN}/{self.repo_id}/"
        fetched: dict[str, None] = {}
        for request in self.remote.requests:
            path = unquote(urlsplit(request.path).path)
            if request.method != "GET":
                continue
            if path.startswith(resolve) and "/" in path[len(resolve) :]:
                fetched[path[len(resolve) :].split("/", 1)[1]] = None
            elif path.startswith(cdn) and "/" in path[len(cdn) :]:
                fetched[path[len(cdn) :].split("/", 1)[1]] = None
        return list(fetched)

    def model_info(self, blobs: bool = False) -> dict[str, Any]:
        siblings = [f.sibling(blobs) for f in self.files.values()]
        used = sum(f.size for f in self.files.values())
        info = self.full_info() | {"sha": self.commit, "spaces": [], "siblings": siblings}
        return info | ({"usedStorage": used} if blobs else {})


def new_repo(
    remote: FakeRemote,
    repo_id: str,
    folder: Path,
    *,
    commit: str | None,
    gated_token: str | None,
    decoys: bool,
    **options: Any,
) -> HubRepo:
    """Files of ``folder`` (plus decoys), each a fresh ``Served`` built with ``options``."""
    contents = {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    files = {name: HubFile(name, Served(data, **options)) for name, data in contents.items()}
    if decoys:
        for name, data in decoy_files(repo_id, contents).items():
            files.setdefault(name, HubFile(name, Served(data, **options), decoy=True))
    digest = hashlib.sha1(repo_id.encode())
    for name in sorted(files):
        digest.update(f"{name}\0{files[name].sha256}\0".encode())
    return HubRepo(
        remote=remote,
        repo_id=repo_id,
        commit=commit or digest.hexdigest(),
        files=files,
        gated_token=gated_token,
        gated="auto" if gated_token else False,
        tags=_tags(contents.get("model_index.json")),
    )


def decoy_files(repo_id: str, contents: Mapping[str, bytes]) -> dict[str, bytes]:
    """What real diffusers repos carry beside the pipeline and a downloader must not fetch:
    a single-file checkpoint at the root, pickled ``.bin`` twins, a model card, git files."""
    rng = random.Random(repo_id)
    block = rng.randbytes(4096)  # repeated: 20 MiB in no time, the same bytes every run
    name = repo_id.rsplit("/", 1)[-1]
    decoys = {f"{name}.safetensors": block * (_DECOY_CHECKPOINT_SIZE // len(block) + 1)}
    for rfilename, data in contents.items():
        if "/" in rfilename and rfilename.endswith(".safetensors"):
            folder, stem = rfilename[: -len(".safetensors")].rsplit("/", 1)
            # transformers' pickles are pytorch_model.bin, diffusers' keep the name
            stem = f"pytorch_{stem}" if stem.split(".")[0] == "model" else stem
            decoys[f"{folder}/{stem}.bin"] = b"PK\x03\x04" + rng.randbytes(len(data))
    decoys["README.md"] = (
        f"---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n---\n\n# {name}\n"
    ).encode()
    decoys[".gitattributes"] = b"".join(
        f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in _LFS_SUFFIXES
    )
    return decoys


def _tags(model_index: bytes | None) -> list[str]:
    tags = ["diffusers", "safetensors", "text-to-image"]
    if model_index is not None:
        class_name = json.loads(model_index).get("_class_name", "")
        tags.append(f"diffusers:{class_name}")
        tags += ["stable-diffusion-xl"] if "XL" in class_name else ["stable-diffusion"]
    return [*tags, "region:us"]


# --- routes ---------------------------------------------------------------------------


def hub_answer(remote: FakeRemote, target: str, headers: Mapping[str, str]) -> Answer | None:
    """The Hub's answer to ``target`` (path and query), or None when it is not a Hub path."""
    split = urlsplit(target)
    path, query = unquote(split.path), parse_qs(split.query)
    authorization = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
    token = authorization.removeprefix("Bearer ").strip() or None
    if path == f"{HUB}/api/models":
        return Answer.json(search(list(remote.hub.values()), query))
    if path.startswith(f"{HUB}/api/models/"):
        repo_id, _, revision = path[len(f"{HUB}/api/models/") :].partition("/revision/")
        repo = _repo(remote, repo_id, revision or "main", token)
        if isinstance(repo, Answer):
            return repo
        blobs = query.get("blobs", [""])[0].lower() in {"1", "true"}
        return Answer.json(repo.model_info(blobs))
    if path.startswith(f"{HUB}/") and "/resolve/" in path:
        repo_id, _, rest = path[len(f"{HUB}/") :].partition("/resolve/")
        revision, _, rfilename = rest.partition("/")
        return _resolve(remote, repo_id, revision, rfilename, token)
    if path.startswith(f"{CDN}/"):
        return _cdn(remote, path)
    return None


def _repo(remote: FakeRemote, repo_id: str, revision: str, token: str | None) -> HubRepo | Answer:
    repo = remote.hub.get(repo_id)
    if not isinstance(repo, HubRepo):  # the Hub says 401 to anonymous callers, 404 otherwise
        return _error(404 if token else 401, "RepoNotFound", "Repository not found")
    if revision not in {"main", repo.commit}:
        return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
    return repo


def _resolve(
    remote: FakeRemote, repo_id: str, revision: str, rfilename: str, token: str | None
) -> Answer:
    repo = _repo(remote, repo_id, revision, token)
    if isinstance(repo, Answer):
        return repo
    if repo.gated_token and token != repo.gated_token:
        message = f"Access to model {repo_id} is restricted. You must have access to it and "
        message += "be authenticated to access it. Please log in."
        return _error(403 if token else 401, "GatedRepo", message)
    file = repo.files.get(rfilename)
    commit = {"X-Repo-Commit": repo.commit}
    if file is None:
        return _error(404, "EntryNotFound", "Entry not found", commit)
    headers = commit | {"ETag": file.etag}
    if file.lfs and repo.cdn:
        location = remote.url(repo.cdn_path(rfilename))
        linked = {"Location": location, "X-Linked-Size": str(file.size), "X-Linked-Etag": file.etag}
        return Answer(302, headers=headers | linked)
    return Answer(200, headers=headers, served=file.served)


def _cdn(remote: FakeRemote, path: str) -> Answer:
    """The CDN serves signed URLs without a token. On loopback it shares the Hub's host, so
    clients follow the Hub's redirect to it: it repeats ``X-Repo-Commit`` for them."""
    for repo in remote.hub.values():
        prefix = f"{CDN}/{repo.repo_id}/"
        if isinstance(repo, HubRepo) and path.startswith(prefix):
            sha256, _, rfilename = path[len(prefix) :].partition("/")
            file = repo.files.get(rfilename)
            if file is not None and file.sha256 == sha256:
                headers = {"ETag": file.etag, "X-Repo-Commit": repo.commit}
                return Answer(200, headers=headers, served=file.served)
    return Answer.json({"error": "NoSuchKey"}, 404)


def search(listings: Sequence[HubListing], query: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """The model search: filters as the Hub applies them, unknown parameters ignored."""
    params = {key.removesuffix("[]"): values for key, values in query.items()}
    text = params.get("search", [""])[0].lower()
    wanted = params.get("filter", []) + params.get("library", [])
    found = [
        listing
        for listing in listings
        if text in listing.repo_id.lower()
        and all(tag in listing.tags for tag in wanted)
        and all(tag == listing.pipeline_tag for tag in params.get("pipeline_tag", []))
        and all(author == listing.author for author in params.get("author", []))
        and all(_truthy(g) == bool(listing.gated) for g in params.get("gated", []))
    ]
    sort = _SORT_KEYS.get(params.get("sort", [""])[0])
    if sort:
        ascending = params.get("direction", ["-1"])[0] == "1"
        found.sort(key=lambda listing: getattr(listing, sort), reverse=not ascending)
    limit = int(params.get("limit", ["1000"])[0])
    return [_shown(listing, params) for listing in found[:limit]]


def _shown(listing: HubListing, params: Mapping[str, list[str]]) -> dict[str, Any]:
    """``expand`` picks fields (plus ``_id``/``id``); ``full`` adds siblings and dates."""
    if "expand" in params:
        info = listing.model_info() if isinstance(listing, HubRepo) else listing.full_info()
        keys = {"_id", "id", *params["expand"]}
        return {key: value for key, value in info.items() if key in keys}
    if params.get("full") and _truthy(params["full"][0]):
        return listing.model_info() if isinstance(listing, HubRepo) else listing.full_info()
    return listing.short_info()


def _truthy(value: str) -> bool:
    return value.lower() in {"1", "true"}


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Answer:
    error = {"X-Error-Code": code, "X-Error-Message": message}
    return Answer.json({"error": message}, status, {**(headers or {}), **error})
