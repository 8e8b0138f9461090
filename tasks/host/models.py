"""Models: every configured HF repo, resolved to a commit, placed in each host's HF cache.

On a host, `<model_cache_dir>/hub/<models--org--name>/` is the standard huggingface_hub layout:

    blobs/<name>               file contents, named by their hash (sha256 for LFS files, git sha1 for others)
    blobs/<name>.incoming-<mark>  a transfer in progress: checked (size, hash) and renamed, never linked
                               (<mark>: the run's, tasks/host/transfer.py RUN_MARK)
    trees/<commit>.json        the tree listing huggingface_hub checks an offline snapshot against
    snapshots/<commit>/<path>  relative symlinks to ../../blobs/<name>; made as <commit>.tmp-<mark> and
                               renamed once every blob is in place, so a partial snapshot is never seen
    refs/<revision>            the commit a branch or tag resolved to

In "control" mode the control node downloads each snapshot once (huggingface_hub's
`snapshot_download` into its own cache) and each host receives only the blobs it lacks. In
"host" mode each host downloads for itself, in a container of the runtime image with the ML env
mounted, into a staging cache next to the real one; the same checks and the same atomic
publication then apply.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict

from pyinfra import host
from pyinfra.api import FactBase, FunctionCommand, StringCommand, operation
from pyinfra.api.command import PyinfraCommand

from ..config import HostConfig, is_revision
from ..control.builder import BaseImage
from ..control.hub import COMMIT, ModelError, RepoEntry, Snapshot, download_snapshot, endpoint_of, resolve_model
from ..report import ModelAction, ModelOutcome, report
from . import deadline, fanout
from .failure import HostProblem, failed, step
from .fanout import PeerRun, Swarm
from .ml_env import EnvPlan, NoEnv, runtime_environment
from .probe import ProbePart
from .programs import program
from .transfer import MARKED, RUN_MARK, StreamedUpload, as_owner, room_problem

BLOB_NAME = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # git sha1 (regular files) or sha256 (LFS files)
# Names the host reports are taken only when they are names this deploy writes; anything else in the
# folder is not ours to judge, use or remove (a planted `blobs/../../etc` is never a "leftover").
# Where the host-mode download container sees the staging cache and the ML env: not below /root,
# which the image keeps to root, as the download runs as the cache's owner.
HOST_DOWNLOAD_HF, HOST_DOWNLOAD_ENV = "/mlstack/hf", "/mlstack/env"
LEFTOVER = {"blob": re.compile(BLOB_NAME.pattern + r"\.incoming" + MARKED),
            "snapshot": re.compile(COMMIT.pattern + r"\.tmp" + MARKED)}


@dataclass(frozen=True)
class RepoCacheState:
    blobs: dict[str, int]  # complete blobs: name -> size
    snapshots: frozenset[str]  # published snapshot dirs (commit shas)
    links: dict[str, str]  # "<commit>/<path>" -> link target, for every link in a published snapshot
    refs: dict[str, str]  # revision name -> commit sha
    trees: frozenset[str]  # commit shas with a cached tree listing
    hashes: dict[str, str]  # blob name -> its content hash as computed on the host (when asked)
    leftovers: tuple[str, ...]  # unfinished transfers, relative to the repo folder
    hashed: bool = False  # hashes were asked: a blob without one is of unknown content, never taken as good


@dataclass(frozen=True)
class ModelCacheState:
    repos: dict[str, RepoCacheState]  # repo folder (models--org--name) -> state; absent folders left out
    free_bytes: int


class ModelCacheFact(FactBase):
    """The HF cache's repo folders this deploy manages (`<cache>/hub/<folder>`), and the room left.

    With `hashes`, every blob is hashed on the host the way its name says: sha256 (LFS files,
    64 hex) or git's blob sha1 (other files, 40 hex).
    """

    def command(self, cache_dir: str, folders: tuple[str, ...], hashes: bool = False) -> str:
        self.folders, self.hashed = set(folders), hashes
        return program("model_cache_probe.sh", cache_dir, int(hashes), *folders)

    def process(self, output: list[str]) -> ModelCacheState:
        free: int | None = None
        repos: dict[str, dict[str, Any]] = {}  # folder -> RepoCacheState's fields, as they are read
        current: dict[str, Any] | None = None
        for line in output:
            kind, _, rest = line.partition(" ")
            if kind == "free" and free is None:
                free = int(rest) * 1024 if rest.isdigit() else 0
            elif kind == "repo":
                current = None
                if rest in getattr(self, "folders", {rest}) and rest not in repos:
                    current = repos[rest] = {"blobs": {}, "snapshots": set(), "links": {}, "refs": {},
                                             "trees": set(), "hashes": {}, "leftovers": []}
            elif current is not None:
                _read_record(current, kind, rest)
        return ModelCacheState(
            repos={
                folder: RepoCacheState(state["blobs"], frozenset(state["snapshots"]), state["links"], state["refs"],
                                       frozenset(state["trees"]), state["hashes"], tuple(sorted(state["leftovers"])),
                                       getattr(self, "hashed", False))
                for folder, state in repos.items()
            },
            free_bytes=free or 0,
        )


def _read_record(repo: dict[str, Any], kind: str, rest: str) -> None:
    """One line of a repo folder's records into REPO; a line of any other shape is ignored."""
    if kind == "blob":
        _read_blob(repo, rest)
    elif kind == "snapshot":
        _read_snapshot(repo, rest)
    elif kind == "link":
        target, _, path = rest.partition(" ")
        if COMMIT.fullmatch(path.split("/", 1)[0]):
            repo["links"][path] = target
    elif kind == "tree" and re.fullmatch(r"[0-9a-f]{40}\.json", rest):
        repo["trees"].add(rest.removesuffix(".json"))
    elif kind == "ref":
        name, _, sha = rest.partition(" ")
        if is_revision(name) and COMMIT.fullmatch(sha):
            repo["refs"][name] = sha
    elif kind == "hash":
        name, _, computed = rest.partition(" ")
        if BLOB_NAME.fullmatch(name) and BLOB_NAME.fullmatch(computed):
            repo["hashes"][name] = computed


def _read_blob(repo: dict[str, Any], rest: str) -> None:
    size, _, name = rest.partition(" ")
    if BLOB_NAME.fullmatch(name) and size.isdigit():
        repo["blobs"][name] = int(size)
    elif LEFTOVER["blob"].fullmatch(name):
        repo["leftovers"].append(f"blobs/{name}")


def _read_snapshot(repo: dict[str, Any], rest: str) -> None:
    """A "d <commit>" record is a published snapshot; anything else named as ours is in the way."""
    file_type, _, name = rest.partition(" ")
    if file_type == "d" and COMMIT.fullmatch(name):
        repo["snapshots"].add(name)
    elif COMMIT.fullmatch(name) or LEFTOVER["snapshot"].fullmatch(name):
        repo["leftovers"].append(f"snapshots/{name}")


def cache_owner(config: HostConfig) -> tuple[int, int]:
    """Who works in the model cache: its owner, so that root never follows what that user plants there."""
    return config.model_cache_dir_uid, config.model_cache_dir_gid


def probe_part(config: HostConfig) -> ProbePart:
    return ProbePart("models", ModelCacheFact, {"cache_dir": config.model_cache_dir,
                                                "hashes": config.model_verify_hashes,
                                                "folders": tuple(spec.folder for spec in config.models)})


@dataclass(frozen=True)
class ModelPlan:
    """What one host needs for one snapshot."""

    snapshot: Snapshot
    send: tuple[RepoEntry, ...]  # blobs the host lacks, or holds with the wrong size or hash
    write_tree: bool
    publish: bool  # the snapshot directory is missing
    relink: tuple[RepoEntry, ...]  # files of a published snapshot whose link is missing or leads elsewhere
    ref: bool  # refs/<revision> must be (re)written
    leftovers: tuple[str, ...]

    @property
    def bytes(self) -> int:
        return sum(entry.size for entry in self.send)

    @property
    def changes(self) -> bool:
        return bool(self.send or self.write_tree or self.publish or self.relink or self.ref or self.leftovers)

    def summary(self) -> str:
        if not self.changes:
            return f"model {self.snapshot.label()}: no change"
        if self.send:
            return f"model {self.snapshot.label()}: {len(self.send)} file(s), {self.bytes / 1e6:.1f} MB to transfer"
        return f"model {self.snapshot.label()}: 0 bytes to transfer, cache metadata to fix"


def plan_model(snapshot: Snapshot, state: RepoCacheState | None) -> ModelPlan:
    state = state or RepoCacheState({}, frozenset(), {}, {}, frozenset(), {}, ())
    send: dict[str, RepoEntry] = {}
    for entry in snapshot.entries:
        held = state.blobs.get(entry.blob)
        content = state.hashes.get(entry.blob, None if state.hashed else entry.blob)  # unknown when hashed and not read
        if held != entry.size or content != entry.blob:
            send.setdefault(entry.blob, entry)
    revision = snapshot.spec.revision
    needs_ref = not COMMIT.fullmatch(revision) and state.refs.get(revision) != snapshot.commit
    publish = snapshot.commit not in state.snapshots
    return ModelPlan(
        snapshot=snapshot,
        send=tuple(send.values()),
        write_tree=snapshot.commit not in state.trees,
        publish=publish,
        relink=() if publish else tuple(
            entry for entry in snapshot.entries
            if state.links.get(f"{snapshot.commit}/{entry.path}") != link_target(entry.path, entry.blob)),
        ref=needs_ref,
        leftovers=state.leftovers,
    )


def link_target(path: str, blob: str) -> str:
    """The relative symlink huggingface_hub makes from snapshots/<commit>/<path> to blobs/<blob>."""
    depth = len(PurePosixPath(path).parts) - 1
    return "../" * (2 + depth) + f"blobs/{blob}"


def publish_commands(repo: str, plan: ModelPlan, owner: tuple[int, int]) -> list[str]:
    """Leftovers (and whatever stands where the snapshot goes) removed, then the snapshot (built under a
    temporary name, then renamed) and the ref, as the cache's owner (files/host/publish_snapshot.sh)."""
    snapshot, commands = plan.snapshot, []
    if plan.leftovers:
        commands.append(program("publish_snapshot.sh", "leftovers", repo, *plan.leftovers))
    if plan.publish:
        commands.append(program("publish_snapshot.sh", "snapshot", repo, snapshot.commit, RUN_MARK,
                                *links(snapshot.entries)))
    if plan.relink:  # a wider pattern set at the same commit, or a link removed: each link made whole in place
        commands.append(program("publish_snapshot.sh", "relink", repo, snapshot.commit, *links(plan.relink)))
    if plan.ref:
        commands.append(program("publish_snapshot.sh", "ref", repo, snapshot.spec.revision, snapshot.commit))
    return [as_owner(*owner, command) for command in commands]


def links(entries: tuple[RepoEntry, ...]) -> list[str]:
    """PATH TARGET for each entry's link, as publish_snapshot.sh takes them."""
    return [arg for entry in entries for arg in (entry.path, link_target(entry.path, entry.blob))]


def repo_dirs_command(cache_dir: str, folder: str, owner: tuple[int, int], mode: str) -> str:
    repo = f"{cache_dir}/hub/{folder}"
    paths = [f"{cache_dir}/hub", repo, *(f"{repo}/{sub}" for sub in ("blobs", "snapshots", "refs", "trees"))]
    return as_owner(*owner, program("cache_dirs.sh", mode, *paths))


def blob_in_place_command(repo: str, entry: RepoEntry) -> str:
    """blobs/<name>.incoming-<mark>, once checked (a regular file of ENTRY's size and hash; otherwise removed),
    becomes blobs/<name> (a rename: never seen half written): files/host/place_blob.sh."""
    return program("place_blob.sh", incoming_blob(repo, entry), f"{repo}/blobs/{entry.blob}", entry.size,
                   entry.blob, entry.path)


def swarm_blobs_command(work: str, repo: str, entries: tuple[RepoEntry, ...]) -> str:
    """The blobs of ENTRIES a swarm fetched into WORK/objects, each checked and placed in REPO as a sent one is;
    then WORK removed (files/host/place_blob.sh --swarm)."""
    return program("place_blob.sh", "--swarm", work, *(
        arg for entry in entries
        for arg in (f"{work}/objects/{entry.blob}", f"{repo}/blobs/{entry.blob}", entry.size, entry.blob, entry.path)))


def take_staged_command(staging: str, staged: str, repo: str, entry: RepoEntry) -> str:
    """The blob a host download left behind ENTRY's path in the snapshot STAGED (of the staging cache
    STAGING) moved to its incoming name: files/host/take_staged.sh."""
    return program("take_staged.sh", staging, f"{staged}/{entry.path}", incoming_blob(repo, entry))


def incoming_blob(repo: str, entry: RepoEntry) -> str:
    return f"{repo}/blobs/{entry.blob}.incoming-{RUN_MARK}"


def tree_upload(repo: str, plan: ModelPlan, control_cache: Path, owner: tuple[int, int]) -> StreamedUpload:
    tree = f"{repo}/trees/{plan.snapshot.commit}.json"
    source = control_cache / plan.snapshot.spec.folder / "trees" / f"{plan.snapshot.commit}.json"
    return StreamedUpload(source, f"tree listing of {plan.snapshot.label()}", tree + ".incoming", owner, 0o644,
                          then=f"mv -f {shlex.quote(tree + '.incoming')} {shlex.quote(tree)}")


def _downloaded(state, host, snapshot: Snapshot, endpoint: str, control_cache: Path) -> bool:
    try:
        download_snapshot(snapshot, endpoint, control_cache)
    except Exception as error:  # noqa: BLE001 (huggingface_hub raises many kinds; each is reported the same way)
        return failed(host, f"model {snapshot.label()}: download on the control node failed: "
                            f"{type(error).__name__}: {error}")
    return True


def control_file(control_cache: Path, snapshot: Snapshot, entry: RepoEntry) -> Path:
    return control_cache / snapshot.spec.folder / "snapshots" / snapshot.commit / entry.path


class ModelUpload(PyinfraCommand):
    """The blobs a host lacks of a snapshot, each sent from the control cache, checked, then renamed (UPLOADS:
    blob -> its upload); with a fan-out (tasks/host/fanout.py), a leecher first fetches them from its peers and
    is sent only those that did not arrive whole, and the seed serves them once it holds them."""

    def __init__(self, label: str, uploads: dict[str, StreamedUpload], sizes: dict[str, int],
                 fan: tuple[Swarm, PeerRun] | None):
        super().__init__()
        self.label, self.uploads, self.sizes, self.fan = label, uploads, sizes, fan

    def __repr__(self):
        return f"ModelUpload({self.label}, {len(self.uploads)} file(s))"

    def execute(self, state, host, connector_arguments) -> bool:
        def direct(adopted: list[str]) -> bool:
            taken = {line.removeprefix("taken ") for line in adopted if line.startswith("taken ")}
            return all(upload.execute(state, host, connector_arguments)
                       for blob, upload in self.uploads.items() if blob not in taken)

        return fanout.take_part(state, host, connector_arguments, self.fan, direct, lambda: self.sizes)


def model_fan_out(config: HostConfig, plan: ModelPlan, base: BaseImage, control_cache: Path
                  ) -> tuple[Swarm, PeerRun] | None:
    """This host's part in the fan-out of PLAN's snapshot, or None: the direct path. The torrent is of the control
    cache's blobs; the seed serves its cache's blobs/ read-only; a leecher's arrive in a staging folder of the
    cache and are checked and placed as sent ones are (`place_blob.sh --swarm`)."""
    spec = plan.snapshot.spec
    swarm = fanout.joined(config, "Model", plan.snapshot.label(), control_cache / spec.folder / "blobs", base,
                          plan.bytes)
    if swarm is None:
        return None
    # One name for every run: a run killed mid-swarm leaves at most this folder, which the next fan-out's stage
    # removes (one run at a time works on a host: its lock).
    repo, work = f"{config.model_cache_dir}/hub/{spec.folder}", f"{config.model_cache_dir}/.swarm"
    adopt = as_owner(*cache_owner(config), swarm_blobs_command(work, repo, plan.send))
    return swarm, fanout.peer_run(config, base, work, f"{repo}/blobs", cache_owner(config),
                                  {"seed": adopt, "leech": adopt})


@operation(is_idempotent=False)
def place_model(cache_dir: str, plan: ModelPlan, endpoint: str, control_cache: Path, owner: tuple[int, int],
                mode: str, fan: tuple[Swarm, PeerRun] | None = None):
    """Send the blobs a host lacks from the control cache (each checked, then renamed; through FAN's swarm where
    it has one), then publish the snapshot."""
    snapshot = plan.snapshot
    repo = f"{cache_dir}/hub/{snapshot.spec.folder}"
    if plan.send:
        yield FunctionCommand(_downloaded, (snapshot, endpoint, control_cache), {})
    yield repo_dirs_command(cache_dir, snapshot.spec.folder, owner, mode)
    uploads = {entry.blob: StreamedUpload(control_file(control_cache, snapshot, entry).resolve(),
                                          f"model file {entry.path}", incoming_blob(repo, entry), owner, 0o644,
                                          then=blob_in_place_command(repo, entry))
               for entry in plan.send}
    if uploads:
        yield ModelUpload(snapshot.label(), uploads, {entry.blob: entry.size for entry in plan.send}, fan)
    if plan.write_tree:
        yield tree_upload(repo, plan, control_cache, owner)
    yield from publish_commands(repo, plan, owner)


def host_download_command(staging: str, plan: ModelPlan, env: EnvPlan, env_dir: str, endpoint: str,
                          owner: tuple[int, int]) -> str:
    """Run snapshot_download on the host, in the runtime image with the ML env mounted, into STAGING,
    as the cache's owner (what the container writes is that user's, wherever a planted link points).

    No token goes along: HF_TOKEN never leaves the control node (gated repos need "control" mode).
    """
    spec, q = plan.snapshot.spec, shlex.quote
    environment = {**runtime_environment(env.base.python, HOST_DOWNLOAD_ENV), "HOME": HOST_DOWNLOAD_HF,
                   "HF_HOME": HOST_DOWNLOAD_HF, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if os.environ.get("HF_HUB_DISABLE_XET"):
        environment["HF_HUB_DISABLE_XET"] = os.environ["HF_HUB_DISABLE_XET"]
    # --mount, not -v: a missing source is an error, not a directory docker creates as root
    return (f"docker run --rm --network host --user {owner[0]}:{owner[1]} "
            f"--mount {q(f'type=bind,source={staging},target={HOST_DOWNLOAD_HF}')} "
            f"--mount {q(f'type=bind,source={env_dir}/envs/{env.wanted},target={HOST_DOWNLOAD_ENV},readonly')} "
            + " ".join(f"-e {key}={q(value)}" for key, value in environment.items())
            + f" --entrypoint '' {env.base.id} "
            + program("download_snapshot.py", f"{HOST_DOWNLOAD_HF}/hub", spec.repo_id, spec.repo_type,
                      plan.snapshot.commit, json.dumps(spec.allow_patterns), json.dumps(spec.ignore_patterns)))


@operation(is_idempotent=False)
def download_model_on_host(cache_dir: str, plan: ModelPlan, env: EnvPlan, env_dir: str, endpoint: str,
                           control_cache: Path, owner: tuple[int, int], mode: str):
    """The host downloads the snapshot itself into a staging cache; what it lacks is then checked and moved in."""
    snapshot, q = plan.snapshot, shlex.quote
    repo = f"{cache_dir}/hub/{snapshot.spec.folder}"
    staging = f"{cache_dir}/.staging-{snapshot.commit[:12]}"
    yield repo_dirs_command(cache_dir, snapshot.spec.folder, owner, mode)
    if plan.send:
        yield as_owner(*owner, f"rm -rf {q(staging)} && install -d -m 0700 {q(staging)}")
        yield StringCommand(host_download_command(staging, plan, env, env_dir, endpoint, owner),  # a transfer
                            **deadline.arguments(host, "transfers"))
        staged = f"{staging}/hub/{snapshot.spec.folder}/snapshots/{snapshot.commit}"
        for entry in plan.send:
            yield as_owner(*owner, f"{take_staged_command(staging, staged, repo, entry)} "
                                   f"&& {blob_in_place_command(repo, entry)}")
        yield as_owner(*owner, f"rm -rf {q(staging)}")
    if plan.write_tree:
        yield tree_upload(repo, plan, control_cache, owner)
    yield from publish_commands(repo, plan, owner)


def _room(state, host, needed: int, free: int) -> bool:
    problem = room_problem(free, needed, "the files to transfer", where=" for the model cache")
    return failed(host, f"models: {problem}") if problem else True


class _CacheArguments(TypedDict):
    """What place_model and download_model_on_host both take: where the cache is and how it is written."""

    cache_dir: str
    endpoint: str
    control_cache: Path
    owner: tuple[int, int]
    mode: str


@step("Models")
def converge(config: HostConfig, env: EnvPlan | NoEnv | None, state: ModelCacheState) -> list[Snapshot]:
    """Resolve every model, then bring this host's cache to it; returns the snapshots (for the stack)."""
    try:
        snapshots = [resolve_model(config, index, spec) for index, spec in enumerate(config.models)]
    except ModelError as error:  # input: every host would fail alike, so the run stops before any change
        raise ModelError(f"{host.name}: {error}") from None
    plans = [plan_model(snapshot, state.repos.get(snapshot.spec.folder)) for snapshot in snapshots]
    record = report[host.name]
    for plan in plans:
        host.log(plan.summary())
        spec = plan.snapshot.spec
        action: ModelAction = "transfer" if plan.send else "repair" if plan.changes else "none"
        record.models.append(ModelOutcome(spec.repo_id, spec.revision, plan.snapshot.commit, plan.bytes, action))
        if plan.changes:
            record.changed("models")
    needed = sum(plan.bytes for plan in plans)
    if needed:
        check_room(name=f"Model cache room for {needed / 1e6:.1f} MB", needed=needed, free=state.free_bytes)
    where = _CacheArguments(cache_dir=config.model_cache_dir, endpoint=endpoint_of(config),
                            control_cache=Path(config.hf_control_cache_dir).expanduser(),
                            owner=cache_owner(config),
                            mode=f"{config.model_cache_dir_mode:04o}")
    for plan in plans:
        if not plan.changes:
            continue
        if config.model_mode == "host" and plan.send:
            if not isinstance(env, EnvPlan):
                raise HostProblem("model_mode = 'host' needs the ML env (its huggingface_hub runs the download), "
                                  "which this host does not have")
            download_model_on_host(name=f"Model {plan.snapshot.label()} (downloaded by the host)", plan=plan, env=env,
                                   env_dir=config.ml_env_dir, **where)
        else:
            fan = model_fan_out(config, plan, env.base, where["control_cache"]) \
                if plan.send and isinstance(env, EnvPlan) else None
            place_model(name=f"Model {plan.snapshot.label()}", plan=plan, fan=fan, **where)
    return snapshots


@operation(is_idempotent=False)
def check_room(needed: int, free: int):
    """Fail the host before any byte is sent if its cache has no room for what it lacks."""
    yield FunctionCommand(_room, (needed, free), {})
