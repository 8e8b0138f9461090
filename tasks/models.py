"""Models: every configured HF repo, resolved to a commit, placed in each host's HF cache.

On a host, `<model_cache_dir>/hub/<models--org--name>/` is the standard huggingface_hub layout:

    blobs/<name>               file contents, named by their hash (sha256 for LFS files, git sha1 for others)
    blobs/<name>.incoming      a transfer in progress: checked (size, hash) and renamed, never linked
    trees/<commit>.json        the tree listing huggingface_hub checks an offline snapshot against
    snapshots/<commit>/<path>  relative symlinks to ../../blobs/<name>; made as <commit>.tmp and
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
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # before huggingface_hub reads its constants

from huggingface_hub.utils import filter_repo_objects  # noqa: E402 (light: HfApi and its HTTP stack load on first request)
from pyinfra import host, logger  # noqa: E402
from pyinfra.api import FunctionCommand, deploy, operation  # noqa: E402
from pyinfra.api.command import FileUploadCommand  # noqa: E402
from pyinfra.api.exceptions import PyinfraError  # noqa: E402

from tasks.config import HostConfig, ModelSpec  # noqa: E402
from tasks.facts import ModelCacheHostState, RepoCacheState  # noqa: E402
from tasks.hostops import RoomCheckedUpload, UploadProgress, once, refuse, room_problem  # noqa: E402
from tasks.ml_env import EnvPlan  # noqa: E402

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

    @property
    def size(self) -> int:
        return sum(entry.size for entry in {entry.blob: entry for entry in self.entries}.values())

    def label(self) -> str:
        return f"{self.spec.repo_id}@{self.spec.revision} ({self.commit[:12]})"


def endpoint_of(config: HostConfig) -> str:
    return config.hf_endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def tree_json(files: list[RepoFile]) -> str:
    listing = {}
    for item in files:
        info = {"size": item.size, "blob_id": item.blob_id}
        if item.lfs is not None:
            info.update(lfs_sha256=item.lfs.sha256, lfs_size=item.lfs.size)
        listing[item.path] = info
    return json.dumps({"format_version": TREE_FORMAT_VERSION, "files": listing}, indent=2, sort_keys=True)


def entries_of(tree: str, spec: ModelSpec) -> tuple[RepoEntry, ...]:
    """The files SPEC's patterns select from a tree listing; paths that could escape the repo are refused."""
    files = json.loads(tree)["files"]
    entries = []
    for path in filter_repo_objects(sorted(files), allow_patterns=spec.allow_patterns, ignore_patterns=spec.ignore_patterns):
        parts = PurePosixPath(path).parts
        if not parts or PurePosixPath(path).is_absolute() or ".." in parts or "\\" in path or "\n" in path:
            raise ModelError(f"{spec}: the endpoint lists a file {path!r} that would land outside the repo folder")
        info = files[path]
        blob = info.get("lfs_sha256") or info["blob_id"]
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", blob):
            raise ModelError(f"{spec}: the endpoint lists {path!r} with a malformed hash {blob!r}")
        entries.append(RepoEntry(path, blob, int(info.get("lfs_size") or info["size"])))
    return tuple(entries)


def resolve(spec: ModelSpec, endpoint: str, control_cache: Path) -> Snapshot:
    """SPEC's revision as a commit and its file list; no request when both are already in the control cache."""
    trees = control_cache / spec.folder / "trees"
    commit = spec.revision if COMMIT.fullmatch(spec.revision) else None
    if commit is None or not (trees / f"{commit}.json").exists():
        from huggingface_hub import HfApi  # noqa: PLC0415 (~0.25 s: only when the mirror must be asked)
        from huggingface_hub.hf_api import RepoFile  # noqa: PLC0415

        api = HfApi(endpoint=endpoint)
        if commit is None:
            commit = api.repo_info(spec.repo_id, revision=spec.revision, repo_type=spec.repo_type).sha
        if not (trees / f"{commit}.json").exists():
            files = [item for item in api.list_repo_tree(spec.repo_id, revision=commit, repo_type=spec.repo_type,
                                                         recursive=True) if isinstance(item, RepoFile)]
            trees.mkdir(parents=True, exist_ok=True)
            partial = trees / f"{commit}.json.partial"
            partial.write_text(tree_json(files))
            partial.rename(trees / f"{commit}.json")
    tree = (trees / f"{commit}.json").read_text()
    return Snapshot(spec, commit, entries_of(tree, spec), tree)


def repo_exists(spec: ModelSpec, endpoint: str) -> bool:
    import httpx2  # noqa: PLC0415 (huggingface_hub's HTTP client)
    from huggingface_hub import HfApi  # noqa: PLC0415
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError  # noqa: PLC0415

    try:
        HfApi(endpoint=endpoint).repo_info(spec.repo_id, repo_type=spec.repo_type)
    except RepositoryNotFoundError:
        return False
    except (HfHubHTTPError, httpx2.HTTPError, OSError):
        return True  # unreachable or failing: not proof that the repo is unknown
    return True


def resolved(config: HostConfig, index: int, spec: ModelSpec) -> Snapshot:
    """SPEC resolved once per deploy; a missing repo or revision is a clear error before any change."""
    endpoint, control_cache = endpoint_of(config), Path(config.hf_control_cache_dir).expanduser()

    unknown_revision = ModelError(f"models[{index}].revision = {spec.revision!r}: expected a branch, tag or commit of "
                                  f"{spec.repo_id} on {endpoint}; it has none of that name")

    def attempt() -> Snapshot:
        try:
            return resolve(spec, endpoint, control_cache)
        except Exception as error:
            import httpx2  # noqa: PLC0415 (loaded already: resolve asked the mirror)
            from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError  # noqa: PLC0415

            if isinstance(error, RevisionNotFoundError):
                raise unknown_revision from None
            if not isinstance(error, (HfHubHTTPError, httpx2.HTTPError, OSError)):
                raise
            # Mirrors answer an unknown revision as an unknown repo (olah: 401) or a server error: ask about the repo alone.
            if not repo_exists(spec, endpoint):
                raise ModelError(f"models[{index}].repo_id = {spec.repo_id!r}: expected a {spec.repo_type} repo on "
                                 f"{endpoint}; it is unknown there (or private: set HF_TOKEN on the control node)") from None
            if isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code < 500 \
                    or isinstance(error, HfHubHTTPError) and COMMIT.fullmatch(spec.revision):
                raise unknown_revision from None
            raise ModelError(f"models[{index}] {spec}: cannot resolve it on {endpoint}: {type(error).__name__}: {error}") from None

    return once(("model", endpoint, str(control_cache), spec), attempt)


@dataclass(frozen=True)
class ModelPlan:
    """What one host needs for one snapshot."""

    snapshot: Snapshot
    send: tuple[RepoEntry, ...]  # blobs the host lacks, or holds with the wrong size or hash
    write_tree: bool
    publish: bool  # the snapshot directory is missing
    ref: bool  # refs/<revision> must be (re)written
    leftovers: tuple[str, ...]

    @property
    def bytes(self) -> int:
        return sum(entry.size for entry in self.send)

    @property
    def changes(self) -> bool:
        return bool(self.send or self.write_tree or self.publish or self.ref or self.leftovers)

    def summary(self) -> str:
        if not self.changes:
            return f"model {self.snapshot.label()}: no change"
        if self.send:
            return f"model {self.snapshot.label()}: {len(self.send)} file(s), {self.bytes / 1e6:.1f} MB to transfer"
        return f"model {self.snapshot.label()}: 0 bytes to transfer, cache metadata to fix"


def plan_model(snapshot: Snapshot, state: RepoCacheState | None) -> ModelPlan:
    state = state or RepoCacheState({}, frozenset(), {}, frozenset(), {}, ())
    send: dict[str, RepoEntry] = {}
    for entry in snapshot.entries:
        held = state.blobs.get(entry.blob)
        if held != entry.size or state.hashes.get(entry.blob, entry.blob) != entry.blob:
            send.setdefault(entry.blob, entry)
    revision = snapshot.spec.revision
    needs_ref = not COMMIT.fullmatch(revision) and state.refs.get(revision) != snapshot.commit
    return ModelPlan(
        snapshot=snapshot,
        send=tuple(send.values()),
        write_tree=snapshot.commit not in state.trees,
        publish=snapshot.commit not in state.snapshots,
        ref=needs_ref,
        leftovers=state.leftovers,
    )


def link_target(path: str, blob: str) -> str:
    """The relative symlink huggingface_hub makes from snapshots/<commit>/<path> to blobs/<blob>."""
    depth = len(PurePosixPath(path).parts) - 1
    return "../" * (2 + depth) + f"blobs/{blob}"


def blob_check_command(incoming: str, entry: RepoEntry) -> str:
    """Succeeds only if INCOMING has ENTRY's size and hash; otherwise removes it."""
    quoted = shlex.quote(incoming)
    if len(entry.blob) == 64:
        hashed = f"echo '{entry.blob}  '{quoted} | sha256sum --check --quiet --strict -"
    else:
        hashed = (f"[ \"$( {{ printf 'blob %s\\000' {entry.size}; cat {quoted}; }} | sha1sum | cut -c1-40)\" "
                  f"= {entry.blob} ]")
    problem = shlex.quote(f"model file {entry.path}: the copy does not match its size or hash; removed, run again")
    return (f"{{ [ \"$(stat -c %s {quoted})\" = {entry.size} ] && {hashed}; }} "
            f"|| {{ rm -f {quoted}; echo {problem} >&2; exit 1; }}")


def publish_commands(repo: str, plan: ModelPlan, owner: str) -> list[str]:
    """Tree listing, snapshot (built under a temporary name, then renamed) and ref, in that order."""
    snapshot, commands = plan.snapshot, []
    q = shlex.quote
    if plan.publish:
        tmp = f"{repo}/snapshots/{snapshot.commit}.tmp"
        dirs = sorted({str(PurePosixPath(entry.path).parent) for entry in snapshot.entries} - {"."})
        steps = [f"rm -rf {q(tmp)}", f"mkdir -p {q(tmp)}"]
        steps += [f"mkdir -p {q(f'{tmp}/{d}')}" for d in dirs]
        steps += [f"ln -s {link_target(entry.path, entry.blob)} {q(f'{tmp}/{entry.path}')}" for entry in snapshot.entries]
        steps += [f"chown -hR {owner} {q(tmp)}", f"mv -T {q(tmp)} {q(f'{repo}/snapshots/{snapshot.commit}')}"]
        commands.append(" && ".join(steps))
    if plan.ref:
        ref = f"{repo}/refs/{snapshot.spec.revision}"
        commands.append(f"mkdir -p {q(str(PurePosixPath(ref).parent))} && printf %s {snapshot.commit} > {q(ref + '.tmp')} "
                        f"&& chown {owner} {q(ref + '.tmp')} && mv -T {q(ref + '.tmp')} {q(ref)}")
    if plan.leftovers:
        commands.append(f"cd {q(repo)} && rm -rf -- " + " ".join(q(path) for path in plan.leftovers))
    return commands


def _fetch_on_control(state, host, snapshot: Snapshot, endpoint: str, control_cache: Path) -> bool:
    """Download the snapshot into the control cache, once per deploy (huggingface_hub shows progress)."""
    def fetch() -> Path:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        folder = snapshot_download(snapshot.spec.repo_id, repo_type=snapshot.spec.repo_type, revision=snapshot.commit,
                                   cache_dir=control_cache, endpoint=endpoint,
                                   allow_patterns=snapshot.spec.allow_patterns, ignore_patterns=snapshot.spec.ignore_patterns)
        return Path(folder)

    try:
        once(("fetch", endpoint, str(control_cache), snapshot.spec.folder, snapshot.commit), fetch)
    except Exception as error:  # noqa: BLE001 (huggingface_hub raises many kinds; each is reported the same way)
        host.log_styled(f"model {snapshot.label()}: download on the control node failed: {type(error).__name__}: {error}",
                        fg="red", log_func=logger.error)
        return False
    return True


def control_file(control_cache: Path, snapshot: Snapshot, entry: RepoEntry) -> Path:
    return control_cache / snapshot.spec.folder / "snapshots" / snapshot.commit / entry.path


def repo_dirs_command(cache_dir: str, folder: str, owner: str, mode: str) -> str:
    uid, gid = owner.split(":")
    repo = f"{cache_dir}/hub/{folder}"
    paths = [f"{cache_dir}/hub", repo, *(f"{repo}/{sub}" for sub in ("blobs", "snapshots", "refs", "trees"))]
    return f"install -d -o {uid} -g {gid} -m {mode} " + " ".join(shlex.quote(path) for path in paths)


def blob_in_place_command(repo: str, entry: RepoEntry, owner: str) -> str:
    """blobs/<name>.incoming, once checked, becomes blobs/<name> (a rename: never seen half written)."""
    incoming, final = shlex.quote(f"{repo}/blobs/{entry.blob}.incoming"), shlex.quote(f"{repo}/blobs/{entry.blob}")
    return (f"{blob_check_command(f'{repo}/blobs/{entry.blob}.incoming', entry)} && chown {owner} {incoming} "
            f"&& mv -f {incoming} {final}")


def tree_commands(repo: str, plan: ModelPlan, control_cache: Path, owner: str):
    tree = f"{repo}/trees/{plan.snapshot.commit}.json"
    yield FileUploadCommand(str(control_cache / plan.snapshot.spec.folder / "trees" / f"{plan.snapshot.commit}.json"),
                            tree + ".incoming", remote_temp_filename=host.get_temp_filename(tree))
    yield f"chown {owner} {shlex.quote(tree + '.incoming')} && mv -f {shlex.quote(tree + '.incoming')} {shlex.quote(tree)}"


@operation(is_idempotent=False)
def place_model(cache_dir: str, plan: ModelPlan, endpoint: str, control_cache: Path, owner: str, mode: str):
    """Send the blobs a host lacks from the control cache (each checked, then renamed), then publish the snapshot."""
    snapshot = plan.snapshot
    repo = f"{cache_dir}/hub/{snapshot.spec.folder}"
    if plan.send:
        yield FunctionCommand(_fetch_on_control, (snapshot, endpoint, control_cache), {})
    yield repo_dirs_command(cache_dir, snapshot.spec.folder, owner, mode)
    for entry in plan.send:
        source = control_file(control_cache, snapshot, entry).resolve()
        yield RoomCheckedUpload(UploadProgress(source, f"model file {entry.path}"), f"{repo}/blobs/{entry.blob}.incoming",
                                remote_temp_filename=host.get_temp_filename(f"{repo}/blobs/{entry.blob}"))
        yield blob_in_place_command(repo, entry, owner)
    if plan.write_tree:
        yield from tree_commands(repo, plan, control_cache, owner)
    yield from publish_commands(repo, plan, owner)


HOST_DOWNLOAD = """
import json, sys
from huggingface_hub import snapshot_download
repo_id, repo_type, commit, allow, ignore = sys.argv[1:6]
print(snapshot_download(repo_id, repo_type=repo_type, revision=commit, cache_dir="/root/.cache/huggingface/hub",
                        allow_patterns=json.loads(allow), ignore_patterns=json.loads(ignore)))
"""


def host_download_command(staging: str, plan: ModelPlan, env: EnvPlan, env_dir: str, endpoint: str) -> str:
    """Run snapshot_download on the host, in the runtime image with the ML env mounted, into STAGING.

    No token goes along: HF_TOKEN never leaves the control node (gated repos need "control" mode).
    """
    spec, q = plan.snapshot.spec, shlex.quote
    environment = {**env.environment(), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if os.environ.get("HF_HUB_DISABLE_XET"):
        environment["HF_HUB_DISABLE_XET"] = os.environ["HF_HUB_DISABLE_XET"]
    return (f"docker run --rm --network host -v {q(staging)}:/root/.cache/huggingface "
            f"-v {q(f'{env_dir}/envs/{env.wanted}')}:/root/.local:ro "
            + " ".join(f"-e {key}={q(value)}" for key, value in environment.items())
            + f" --entrypoint python3 {env.base.id} -c {q(HOST_DOWNLOAD)} "
            + " ".join(q(arg) for arg in (spec.repo_id, spec.repo_type, plan.snapshot.commit,
                                          json.dumps(spec.allow_patterns), json.dumps(spec.ignore_patterns))))


@operation(is_idempotent=False)
def download_model_on_host(cache_dir: str, plan: ModelPlan, env: EnvPlan, env_dir: str, endpoint: str,
                           control_cache: Path, owner: str, mode: str):
    """The host downloads the snapshot itself into a staging cache; what it lacks is then checked and moved in."""
    snapshot, q = plan.snapshot, shlex.quote
    repo = f"{cache_dir}/hub/{snapshot.spec.folder}"
    staging = f"{cache_dir}/.staging-{snapshot.commit[:12]}"
    yield repo_dirs_command(cache_dir, snapshot.spec.folder, owner, mode)
    if plan.send:
        yield f"rm -rf {q(staging)} && install -d -m 0700 {q(staging)}"
        yield host_download_command(staging, plan, env, env_dir, endpoint)
        staged = f"{staging}/hub/{snapshot.spec.folder}/snapshots/{snapshot.commit}"
        for entry in plan.send:
            yield (f"mv -f \"$(readlink -f {q(f'{staged}/{entry.path}')})\" {q(f'{repo}/blobs/{entry.blob}.incoming')} "
                   f"&& {blob_in_place_command(repo, entry, owner)}")
        yield f"rm -rf {q(staging)}"
    if plan.write_tree:
        yield from tree_commands(repo, plan, control_cache, owner)
    yield from publish_commands(repo, plan, owner)


def _room(state, host, needed: int, free: int) -> bool:
    problem = room_problem(free, needed, "the files to transfer", where=" for the model cache")
    if problem:
        host.log_styled(f"models: {problem}", fg="red", log_func=logger.error)
    return problem is None


@deploy("Models")
def models(config: HostConfig, env: EnvPlan | None, state: ModelCacheHostState) -> list[Snapshot]:
    """Resolve every model, then bring this host's cache to it; returns the snapshots (for the stack)."""
    try:
        snapshots = [resolved(config, index, spec) for index, spec in enumerate(config.models)]
    except ModelError as error:
        raise ModelError(f"{host.name}: {error}") from None
    plans = [plan_model(snapshot, state.repos.get(snapshot.spec.folder)) for snapshot in snapshots]
    for plan in plans:
        host.log(plan.summary())
    needed = sum(plan.bytes for plan in plans)
    if needed:
        check_room(name=f"Model cache room for {needed / 1e6:.1f} MB", needed=needed, free=state.free_bytes)
    where = dict(cache_dir=config.model_cache_dir, endpoint=endpoint_of(config),
                 control_cache=Path(config.hf_control_cache_dir).expanduser(),
                 owner=f"{config.model_cache_dir_uid}:{config.model_cache_dir_gid}", mode=f"{config.model_cache_dir_mode:04o}")
    for plan in plans:
        if not plan.changes:
            continue
        if config.model_mode == "host" and plan.send:
            if env is None:
                refuse(name=f"Model {plan.snapshot.label()}", message=f"{host.name}: model_mode = 'host' needs the ML env "
                       "(its huggingface_hub runs the download), which this host does not have")
                continue
            download_model_on_host(name=f"Model {plan.snapshot.label()} (downloaded by the host)", plan=plan, env=env,
                                   env_dir=config.ml_env_dir, **where)
        else:
            place_model(name=f"Model {plan.snapshot.label()}", plan=plan, **where)
    return snapshots


@operation(is_idempotent=False)
def check_room(needed: int, free: int):
    """Fail the host before any byte is sent if its cache has no room for what it lacks."""
    yield FunctionCommand(_room, (needed, free), {})
