"""Models on the control side: each configured HF repo resolved to a commit and its file list, and
the snapshot downloaded once per deploy into the control cache (`hf_control_cache_dir`).

Everything the endpoint answers is checked here, at the boundary, before it is cached or used.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import TYPE_CHECKING, Callable, TypeVar
from urllib.parse import urlsplit

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # before huggingface_hub reads its constants

from huggingface_hub.utils import filter_repo_objects  # light: HfApi and its HTTP stack load on first request
from pyinfra.api.exceptions import PyinfraError

from .. import secrets
from ..config import HostConfig, ModelSpec
from .caches import atomic_write, once

if TYPE_CHECKING:
    from huggingface_hub.hf_api import RepoFile

COMMIT = re.compile(r"[0-9a-f]{40}")
TREE_FORMAT_VERSION = 1  # huggingface_hub's trees/<commit>.json format


class ModelError(PyinfraError):
    """A model cannot be planned; the message names the host, the setting, the value and the cause."""


@dataclass(frozen=True)
class RepoEntry:
    """One file of a snapshot: where it goes and what its content hashes to."""

    path: str
    blob: str  # the blob's name: sha256 for LFS files, git blob sha1 for the others
    size: int


@dataclass(frozen=True)
class Snapshot:
    """A model entry resolved: its commit, the files the patterns select, the full tree listing."""

    spec: ModelSpec
    commit: str
    entries: tuple[RepoEntry, ...]
    tree: str  # trees/<commit>.json as huggingface_hub writes it (all files, not only the selected ones)
    token_over_http: bool = field(default=False, compare=False)  # hf_token_over_http, for its download

    @property
    def size(self) -> int:
        return sum(entry.size for entry in {entry.blob: entry for entry in self.entries}.values())

    def label(self) -> str:
        return f"{self.spec.repo_id}@{self.spec.revision} ({self.commit[:12]})"


def endpoint_of(config: HostConfig) -> str:
    """The endpoint as configured: `${VAR}` credentials unexpanded. Shown only `secrets.masked`; expanded only
    here, for the control node's own requests (`_client_endpoint`)."""
    return config.hf_endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def _client_endpoint(endpoint: str) -> str:
    return secrets.expand(endpoint)


def token_for(endpoint: str, allow_http: bool) -> bool | None:
    """huggingface_hub's `token=` for requests to ENDPOINT: None lets it send the control node's HF_TOKEN (or
    stored login); False sends none, which is the answer for a plain http:// endpoint unless ALLOW_HTTP
    (`hf_token_over_http`) says otherwise: anyone on the path would read the token."""
    try:
        scheme = urlsplit(endpoint).scheme.lower()
    except ValueError:
        return False
    return False if scheme == "http" and not allow_http else None


T = TypeVar("T")


def _scrubbing(endpoint: str, make: Callable[[], T]) -> Callable[[], T]:
    """MAKE, any error it raises shown without the values of ENDPOINT's `${VAR}` credentials (huggingface_hub's
    errors quote the URL it asked, which holds them)."""
    def run() -> T:
        try:
            return make()
        except Exception as error:
            text = str(error)
            clean = secrets.scrubbed(text, endpoint)
            if clean == text:
                raise
            raise ModelError(clean if isinstance(error, ModelError) else f"{type(error).__name__}: {clean}") from None
    return run


def tree_json(files: list[RepoFile]) -> str:
    listing = {}
    for item in files:
        info = {"size": item.size, "blob_id": item.blob_id}
        if item.lfs is not None:
            info.update(lfs_sha256=item.lfs.sha256, lfs_size=item.lfs.size)
        listing[item.path] = info
    return json.dumps({"format_version": TREE_FORMAT_VERSION, "files": listing}, indent=2, sort_keys=True)


UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")  # controls, bidi overrides
MAX_PATH = 1024


def listed_file_problem(path: object, info: object) -> str | None:
    """Why one file of an endpoint's tree listing must not be used, or None. Every file is checked (not
    only those the patterns select): a listing with any bad entry is not cached."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or UNPRINTABLE.search(path):
        return "whose name has control characters, is empty or is too long"
    parts = PurePosixPath(path).parts
    if PurePosixPath(path).is_absolute() or ".." in parts or "\\" in path or "//" in path:
        return "that would land outside the repo folder"
    if not isinstance(info, dict):
        return "whose entry is not a mapping"
    for key in ("size", "lfs_size") if "lfs_size" in info else ("size",):
        if not _count(info.get(key)):
            return f"with a size that is not a byte count: {info.get(key)!r}"
    if not isinstance(info.get("blob_id"), str) or not re.fullmatch(r"[0-9a-f]{40}", info["blob_id"]):
        return f"with a malformed blob id {info.get('blob_id')!r}"
    if "lfs_sha256" in info and not (isinstance(info["lfs_sha256"], str)
                                     and re.fullmatch(r"[0-9a-f]{64}", info["lfs_sha256"])):
        return f"with a malformed sha256 {info['lfs_sha256']!r}"
    return None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**50


def checked_listing(tree: str, spec: ModelSpec) -> dict[str, dict]:
    """The files of a tree listing (path -> info), every entry checked; ModelError names the first bad one."""
    try:
        files = json.loads(tree)["files"]
    except (ValueError, KeyError, TypeError):
        raise ModelError(f"{spec}: the endpoint's tree listing is not a listing of files") from None
    if not isinstance(files, dict):
        raise ModelError(f"{spec}: the endpoint's tree listing is not a listing of files")
    for path, info in files.items():
        problem = listed_file_problem(path, info)
        if problem:
            raise ModelError(f"{spec}: the endpoint lists a file {path!r} {problem}; refusing this revision "
                             "(nothing was cached or sent)")
    return files


def entries_of(tree: str, spec: ModelSpec) -> tuple[RepoEntry, ...]:
    """The files SPEC's patterns select from a checked tree listing."""
    files = checked_listing(tree, spec)
    entries = []
    for path in filter_repo_objects(sorted(files), allow_patterns=_patterns(spec.allow_patterns),
                                    ignore_patterns=_patterns(spec.ignore_patterns)):
        info = files[path]
        blob = info.get("lfs_sha256") or info["blob_id"]
        entries.append(RepoEntry(path, blob, info["lfs_size"] if "lfs_size" in info else info["size"]))
    return tuple(entries)


def checked_commit(answer: object, spec: ModelSpec) -> str:
    """The commit the endpoint resolved SPEC's revision to, if it is one (40 hex digits)."""
    if not isinstance(answer, str) or not COMMIT.fullmatch(answer):
        raise ModelError(f"{spec}: the endpoint resolved revision {spec.revision!r} to {answer!r}, which is not a "
                         "commit (40 hex digits); refusing it (nothing was cached or sent)")
    return answer


def ask_endpoint(spec: ModelSpec, endpoint: str, control_cache: Path, token_over_http: bool = False) -> Snapshot:
    """SPEC's revision as a commit and its file list; no request when both are already in the control cache."""
    trees = control_cache / spec.folder / "trees"
    commit = spec.revision if COMMIT.fullmatch(spec.revision) else None
    if commit is None or not (trees / f"{commit}.json").exists():
        from huggingface_hub import HfApi  # here: ~0.25 s, only when the mirror must be asked
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=_client_endpoint(endpoint), token=token_for(endpoint, token_over_http))
        try:
            if commit is None:
                info = api.repo_info(spec.repo_id, revision=spec.revision, repo_type=spec.repo_type)
                commit = checked_commit(info.sha, spec)
            if not (trees / f"{commit}.json").exists():
                files = [item for item in api.list_repo_tree(spec.repo_id, revision=commit, repo_type=spec.repo_type,
                                                             recursive=True) if isinstance(item, RepoFile)]
                tree = tree_json(files)
                checked_listing(tree, spec)  # before it is cached: a bad listing is never planned from again
                atomic_write(trees / f"{commit}.json", tree)
        except (KeyError, TypeError, AttributeError) as error:  # huggingface_hub parsing an answer of the wrong shape
            raise ModelError(f"{spec}: the endpoint's answer is malformed ({type(error).__name__}: {error!r}); "
                             "refusing it (nothing was cached or sent)") from None
    tree = (trees / f"{commit}.json").read_text()
    return Snapshot(spec, commit, entries_of(tree, spec), tree, token_over_http)


def _patterns(patterns: tuple[str, ...] | None) -> list[str] | None:
    """A model entry's patterns as huggingface_hub's `allow_patterns`/`ignore_patterns` take them."""
    return None if patterns is None else list(patterns)


def request_errors(httpx: ModuleType) -> tuple[type[BaseException], ...]:
    """What asking the endpoint raises when it is unreachable or answers an error: huggingface_hub turns an error
    status into its HfHubHTTPError (a subclass of its HTTP client's HTTPError); a connection failure or timeout
    comes through as the client's own ConnectError, TimeoutException… (HTTPError too), a file it cannot write as
    OSError. HTTPX is `huggingface_hub.utils.httpx`: its HTTP client, exported under that name since 1.32 (httpx
    before 2.0, httpx2 since), so this module names no client itself."""
    return (httpx.HTTPError, OSError)


def repo_exists(spec: ModelSpec, endpoint: str, token_over_http: bool = False) -> bool:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import httpx  # its HTTP client, whichever (httpx2 from 2.0): see request_errors

    try:
        HfApi(endpoint=_client_endpoint(endpoint), token=token_for(endpoint, token_over_http)).repo_info(
            spec.repo_id, repo_type=spec.repo_type)
    except RepositoryNotFoundError:
        return False
    except request_errors(httpx):
        return True  # unreachable or failing: not proof that the repo is unknown
    return True


def resolve_model(config: HostConfig, index: int, spec: ModelSpec) -> Snapshot:
    """`models[INDEX]` as a commit and its files, once per deploy; a missing repo or revision is a clear error
    before any change."""
    endpoint, control_cache = endpoint_of(config), Path(config.hf_control_cache_dir).expanduser()
    shown, over_http = secrets.masked(endpoint), config.hf_token_over_http

    unknown_revision = ModelError(f"models[{index}].revision = {spec.revision!r}: expected a branch, tag or commit of "
                                  f"{spec.repo_id} on {shown}; it has none of that name")

    def attempt() -> Snapshot:
        try:
            return ask_endpoint(spec, endpoint, control_cache, over_http)
        except Exception as error:
            from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
            from huggingface_hub.utils import httpx  # loaded already: ask_endpoint asked the mirror

            if isinstance(error, RevisionNotFoundError):
                raise unknown_revision from None
            if not isinstance(error, request_errors(httpx)):
                raise
            # Mirrors answer an unknown revision as an unknown repo (olah: 401) or a server error:
            # ask about the repo alone.
            if not repo_exists(spec, endpoint, over_http):
                private = ("(or private: set HF_TOKEN on the control node)" if token_for(endpoint, over_http) is None
                           else "(or private: HF_TOKEN is not sent to a plain http:// endpoint "
                                "unless hf_token_over_http is True)")
                raise ModelError(f"models[{index}].repo_id = {spec.repo_id!r}: expected a {spec.repo_type} repo on "
                                 f"{shown}; it is unknown there {private}") from None
            if isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code < 500 \
                    or isinstance(error, HfHubHTTPError) and COMMIT.fullmatch(spec.revision):
                raise unknown_revision from None
            raise ModelError(f"models[{index}] {spec}: cannot resolve it on {shown}: "
                             f"{type(error).__name__}: {error}") from None

    return once(("model", endpoint, str(control_cache), spec, over_http), _scrubbing(endpoint, attempt))


def download_snapshot(snapshot: Snapshot, endpoint: str, control_cache: Path) -> Path:
    """SNAPSHOT's selected files in the control cache, downloaded once per deploy (huggingface_hub shows progress).

    Keyed by the model entry itself: two entries for one commit with other patterns select other files.
    """
    def download() -> Path:
        from huggingface_hub import snapshot_download

        spec = snapshot.spec
        return Path(snapshot_download(spec.repo_id, repo_type=spec.repo_type, revision=snapshot.commit,
                                      cache_dir=control_cache, endpoint=_client_endpoint(endpoint),
                                      token=token_for(endpoint, snapshot.token_over_http),
                                      allow_patterns=_patterns(spec.allow_patterns),
                                      ignore_patterns=_patterns(spec.ignore_patterns)))

    return once(("download", endpoint, str(control_cache), snapshot.spec, snapshot.commit, snapshot.token_over_http),
                _scrubbing(endpoint, download))


def control_file(control_cache: Path, snapshot: Snapshot, entry: RepoEntry) -> Path:
    return control_cache / snapshot.spec.folder / "snapshots" / snapshot.commit / entry.path
