"""`mlstack prune`: what each host keeps for rollbacks trimmed to its last KEEP releases, as a pyinfra packaged
function (`prune`), run once over the targeted hosts by tasks/fleet/prune.py with its options in $MLSTACK_PRUNE
(JSON: {"keep": N, "dry": bool}).

On each host, under its deploy lock: the current release and the KEEP-1 other most recently activated ones are
kept, the releases beyond go (`releases.sh forget`), then what no kept release uses, and nothing else:

- envs: every `envs/<id>` but `active`, the kept releases' envs and any env a container mounts; then the store's
  objects no env links to any more (`env_store.sh collect`), as the env dir's owner;
- model snapshots, only in the cache folders some release names (a folder no release names is never touched):
  each `snapshots/<commit>` no kept release uses, the refs that name it, its tree listing, and the blobs it
  links to that no remaining snapshot links to, as the cache's owner;
- images: the image ids of removed releases that no kept release and no container (running or not) uses, nor
  the host's runtime base image, `docker image rm` by id, never forced.

Every name the host reports is checked before it is used (RELEASE_ID, ENV_ID, IMAGE_ID, COMMIT, blob names,
FOLDER); sizes are read while planning, so `--dry` lists the same as a run removes. The report's `prune` field
holds what each host keeps, what goes, its size, and (in a run) the steps done; the control node's caches are
trimmed afterwards from it (tasks/fleet/prune.py, tasks/control/trim.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, FunctionCommand, StringCommand, operation

from .config import _REPO_PART, ENV_ID, HostConfig
from .control.hub import COMMIT
from .fleet.day_two import printable
from .fleet.prune import DEFAULT_KEEP, PRUNE_OPTIONS, human
from .host import ml_env, owners, releases
from .host.lock import hold_deploy_lock
from .host.ml_env import MlEnvState
from .host.models import BLOB_NAME, ModelCacheFact, ModelCacheState, RepoCacheState, cache_owner
from .host.probe import ProbePart, probe_host
from .host.programs import program
from .host.releases import IMAGE_ID, Release, ReleasesState
from .host.transfer import as_owner
from .report import report
from .validation import host_config

FOLDER = re.compile(rf"(?:model|dataset)s--{_REPO_PART}(?:--{_REPO_PART})?")  # an HF cache's repo folder
LINK_TARGET = re.compile(rf"(?:\.\./)+blobs/({BLOB_NAME.pattern})")  # a snapshot file's link to its blob


# -- what the host says, besides the deploy's own facts ---------------------------------------------------------


@dataclass(frozen=True)
class HostImages:
    sizes: dict = field(default_factory=dict)  # image id -> bytes, as docker counts them (shared layers too)
    in_use: frozenset[str] = frozenset()  # the image id of every container, running or not
    layers: dict = field(default_factory=dict)  # image id -> its layers' diff ids, base first

    def freed(self, image_id: str, going: set[str]) -> tuple[int, bool]:
        """(bytes, exact) that removing IMAGE_ID frees when the images GOING go too: its size less its layers that
        an image staying shares. Layers are shared as a common first part of two images' lists; its size is known
        when some staying image is made of exactly that part (the base image, often): else the bytes are an upper
        bound (exact False)."""
        layers, size = self.layers.get(image_id, ()), self.sizes.get(image_id, 0)
        shared, known = 0, {0: 0}  # the longest common first part; first-part lengths whose size is known
        for other, theirs in self.layers.items():
            if other in going or other == image_id:
                continue
            pairs = enumerate(zip(layers, theirs, strict=False))  # up to the shorter one's end
            common = next((index for index, (mine, their) in pairs if mine != their), min(len(layers), len(theirs)))
            shared = max(shared, common)
            if common == len(theirs):
                known[common] = max(known.get(common, 0), self.sizes.get(other, 0))
        if shared in known:
            return max(size - known[shared], 0), True
        return max(size - max(known.values()), 0), False


class ImagesFact(FactBase):
    """Every image with its size, and the images the host's containers use (files/host/prune.sh images)."""

    def command(self) -> str:
        return program("prune.sh", "images")

    def process(self, output: list[str]) -> HostImages:
        sizes, in_use, layers = {}, set(), {}
        for line in output:
            kind, _, rest = line.partition(" ")
            words = rest.split()
            image_id, size, diff_ids = (words + ["", ""])[0], (words + ["", ""])[1], words[2:]
            if kind == "image" and IMAGE_ID.fullmatch(image_id) and size.isdigit():
                sizes[image_id] = int(size)
                layers[image_id] = tuple(diff_ids) if all(IMAGE_ID.fullmatch(diff) for diff in diff_ids) else ()
            elif kind == "container" and IMAGE_ID.fullmatch(rest):
                in_use.add(rest)
        return HostImages(sizes, frozenset(in_use), layers)


class EnvSizesFact(FactBase):
    """What removing ENVS frees (files/host/prune.sh env-sizes), read as the env dir's owner: env id -> bytes."""

    def command(self, env_dir: str, envs: tuple[str, ...], owner: tuple[int, int]) -> str:
        return as_owner(*owner, program("prune.sh", "env-sizes", env_dir, *envs))

    def process(self, output: list[str]) -> dict[str, int]:
        sizes = {}
        for line in output:
            kind, env, size = (line.split(" ") + ["", ""])[:3]
            if kind == "env" and ENV_ID.fullmatch(env) and size.isdigit():
                sizes[env] = int(size)
        return sizes


# -- what one host keeps and removes (pure) ---------------------------------------------------------------------


def kept_releases(state: ReleasesState, keep: int) -> tuple[list[Release], list[Release]]:
    """(kept, removed), each oldest activation first: the current release and the KEEP-1 most recently activated
    others are kept. Without a current release (none recorded, or its record unreadable) nothing is removed: what
    runs is not known."""
    every = list(state.releases.values())
    if state.current not in state.releases:
        return every, []
    others = [release for release in every if release.id != state.current]
    stay = {state.current, *(release.id for release in others[len(others) - (keep - 1):] if keep > 1)}
    return ([release for release in every if release.id in stay],
            [release for release in every if release.id not in stay])


@dataclass(frozen=True)
class SnapshotRemoval:
    folder: str  # models--org--name
    commit: str
    refs: tuple[str, ...]  # refs/<name> that name the commit
    blobs: tuple[str, ...]  # blobs it links to that no remaining snapshot links to
    bytes: int  # the sizes of those blobs

    def paths(self, tree: bool) -> list[str]:
        """What goes, relative to the repo folder, the snapshot first (never a snapshot left without its blobs)."""
        return [f"snapshots/{self.commit}", *(f"refs/{ref}" for ref in self.refs),
                *([f"trees/{self.commit}.json"] if tree else []), *(f"blobs/{blob}" for blob in self.blobs)]


@dataclass(frozen=True)
class PrunePlan:
    kept: tuple[str, ...]  # release ids, oldest activation first
    removed: tuple[str, ...]
    envs: tuple[str, ...]  # env ids whose envs/<id> goes
    snapshots: tuple[SnapshotRemoval, ...]
    images: tuple[str, ...]  # image ids
    folders: tuple[str, ...]  # the model cache folders some release names (the only ones looked into)
    notes: tuple[str, ...] = ()  # what stays although no kept release uses it, and why


def release_folders(state: ReleasesState) -> tuple[str, ...]:
    """The model cache folders any release on the host names (checked names only)."""
    return tuple(sorted({folder for release in state.releases.values() for folder in release.models
                         if FOLDER.fullmatch(folder)}))


def env_removals(kept: list[Release], envs: MlEnvState) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(envs that go, notes): every complete env but the active one, the kept releases' and those a container
    mounts."""
    keep = {envs.active, *(release.env for release in kept)}
    mounted = {path.removeprefix("envs/"): project for path, project in envs.mounted}
    candidates = sorted(env for env in envs.envs if env not in keep and ENV_ID.fullmatch(env))
    notes = tuple(f"env {env} stays: a container of {f'project {mounted[env]}' if mounted[env] else 'no project'} "
                  "mounts it" for env in candidates if env in mounted)
    return tuple(env for env in candidates if env not in mounted), notes


def snapshot_removals(kept: list[Release], folders: tuple[str, ...], cache: ModelCacheState
                      ) -> tuple[SnapshotRemoval, ...]:
    """In each of FOLDERS, every snapshot no kept release uses, with the refs naming it and the blobs only the
    snapshots that go link to (a blob no snapshot links to is left: it may be a kept snapshot's, its link lost)."""
    removals = []
    for folder in folders:
        repo = cache.repos.get(folder)
        if repo is None:
            continue
        used = {release.models[folder] for release in kept if folder in release.models}
        going = sorted(commit for commit in repo.snapshots if commit not in used and COMMIT.fullmatch(commit))
        staying = {blob for path, blob in linked(repo) if path.split("/", 1)[0] not in going}
        counted: set[str] = set()
        for commit in going:
            blobs = sorted({blob for path, blob in linked(repo) if path.split("/", 1)[0] == commit
                            and blob not in staying and blob not in counted and blob in repo.blobs})
            counted.update(blobs)
            refs = tuple(sorted(ref for ref, target in repo.refs.items() if target == commit))
            removals.append(SnapshotRemoval(folder, commit, refs, tuple(blobs),
                                            sum(repo.blobs[blob] for blob in blobs)))
    return tuple(removals)


def linked(repo: RepoCacheState) -> list[tuple[str, str]]:
    """(snapshot path, blob) for every link of a published snapshot that leads to a blob of the folder."""
    return [(path, match.group(1)) for path, target in repo.links.items()
            if (match := LINK_TARGET.fullmatch(target))]


def image_removals(kept: list[Release], removed: list[Release], images: HostImages, base_image: str | None
                   ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(image ids that go, notes): the removed releases' images the host holds that no kept release uses, no
    container uses and that are not the host's runtime base image."""
    keep = {image_id for release in kept for image_id in release.image_ids.values()}
    candidates = sorted({image_id for release in removed for image_id in release.image_ids.values()
                         if image_id in images.sizes} - keep)
    protected = {image_id: "a container uses it" for image_id in candidates if image_id in images.in_use}
    if base_image in candidates and base_image not in protected:
        protected[base_image] = "it is the runtime base image (ml_env_base_image)"
    notes = tuple(f"image {image_id[:19]} stays: {why}" for image_id, why in sorted(protected.items()))
    return tuple(image_id for image_id in candidates if image_id not in protected), notes


def plan_prune(state: ReleasesState, keep: int, envs: MlEnvState, cache: ModelCacheState, images: HostImages
               ) -> PrunePlan:
    """What one host keeps and removes, from what it holds."""
    kept, removed = kept_releases(state, keep)
    folders = release_folders(state)
    env_ids, env_notes = env_removals(kept, envs)
    image_ids, image_notes = image_removals(kept, removed, images, envs.image_id)
    notes = () if state.current in state.releases or not state.releases else (
        "no current release is recorded: no release is removed",)
    return PrunePlan(tuple(release.id for release in kept), tuple(release.id for release in removed), env_ids,
                     snapshot_removals(kept, folders, cache), image_ids, folders, (*notes, *env_notes, *image_notes))


def needs(plan: PrunePlan, state: ReleasesState, envs: MlEnvState) -> dict:
    """What the host still needs from the control node's caches once the plan is carried out: the envs it keeps,
    the model commits of its kept releases (in the folders its releases name) and its kept releases' images."""
    kept = [state.releases[release] for release in plan.kept]
    return {"envs": sorted(set(envs.envs) - set(plan.envs)),
            "folders": list(plan.folders),
            "models": {folder: sorted({release.models[folder] for release in kept if folder in release.models})
                       for folder in plan.folders},
            "images": sorted({image for release in kept for image in release.images.values()})}


def prune_record(plan: PrunePlan, state: ReleasesState, envs: MlEnvState, env_sizes: dict[str, int],
                 images: HostImages, config: HostConfig, keep: int, dry: bool) -> dict:
    """The report's `prune` field of one host (tasks/fleet/prune.py prints it and trims the control caches)."""
    return {
        "keep": keep, "dry": dry, "current": state.current,
        "releases": {"kept": [release_entry(state.releases[release]) for release in plan.kept],
                     "removed": [release_entry(state.releases[release]) for release in plan.removed]},
        "envs": [{"id": env, "bytes": env_sizes.get(env, 0)} for env in plan.envs],
        "snapshots": [{**asdict(snapshot), "refs": list(snapshot.refs), "blobs": len(snapshot.blobs)}
                      for snapshot in plan.snapshots],
        "images": [{"id": image_id, "size": images.sizes.get(image_id, 0),
                    **dict(zip(("bytes", "exact"), images.freed(image_id, set(plan.images)), strict=True)),
                    "services": sorted({service for release in state.releases.values()
                                        for service, used in release.image_ids.items() if used == image_id})}
                   for image_id in plan.images],
        "notes": list(plan.notes),
        "needs": needs(plan, state, envs),
        "caches": {name: str(Path(getattr(config, setting)).expanduser()) for name, setting in
                   (("ml_env", "ml_env_cache_dir"), ("images", "image_cache_dir"), ("hf", "hf_control_cache_dir"))},
        "done": [],
    }


def release_entry(release: Release) -> dict:
    return {"id": release.id, "activated": release.activated, "env": release.env, "project": release.project}


# -- the packaged function --------------------------------------------------------------------------------------


def prune_options() -> tuple[int, bool]:
    """(keep, dry) from $MLSTACK_PRUNE; a bad value stops the run before any host changes."""
    try:
        options = json.loads(os.environ.get(PRUNE_OPTIONS) or "{}")
        keep, dry = options.get("keep", DEFAULT_KEEP), options.get("dry", False)
    except (ValueError, AttributeError):
        keep, dry = None, None
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1 or not isinstance(dry, bool):
        raise ValueError(f"{PRUNE_OPTIONS}: expected JSON such as {{\"keep\": 3, \"dry\": false}} with keep ≥ 1")
    return keep, dry


def prune() -> None:
    """The prune's steps for one host (pyinfra runs it for each)."""
    report.start()
    keep, dry = prune_options()
    config = host_config(host)
    if not hold_deploy_lock():  # no deploy or rollback changes the host while its releases are weighed
        return
    env_part = ml_env.probe_part(config)
    on_host = owners.probe_checked(config, releases.probe_part(config),
                                   replace(env_part, arguments={**env_part.arguments, "hash_as": None}),
                                   ProbePart("images", ImagesFact))
    if on_host is None:
        return
    state, envs, images = on_host
    kept, _ = kept_releases(state, keep)
    folders = release_folders(state)
    env_ids, _ = env_removals(kept, envs)
    parts = ([ProbePart("models", ModelCacheFact, {"cache_dir": config.model_cache_dir, "folders": folders})]
             if folders else [])
    if env_ids:
        parts.append(ProbePart("env_sizes", EnvSizesFact, {"env_dir": config.ml_env_dir, "envs": env_ids,
                                                          "owner": ml_env.env_owner(config)}))
    read = probe_host(*parts) if parts else ()
    if read is None:
        return
    values = dict(zip((part.name for part in parts), read, strict=True))
    cache = values.get("models") or ModelCacheState({}, 0)
    plan = plan_prune(state, keep, envs, cache, images)
    record = report[host.name]
    record.prune = prune_record(plan, state, envs, values.get("env_sizes", {}), images, config, keep, dry)
    record.planned = True
    log_plan(plan, record.prune, dry)
    if dry or not (plan.removed or plan.envs or plan.snapshots or plan.images):
        return
    record.changed("prune")
    if plan.removed:
        forget_releases(name=f"Forget {len(plan.removed)} release(s)", releases_dir=releases.releases_dir(config),
                        ids=plan.removed)
    if plan.envs:
        remove_envs(name=f"Remove {len(plan.envs)} env(s), then the objects no env links to",
                    env_dir=config.ml_env_dir, envs=plan.envs, owner=ml_env.env_owner(config))
    for folder in sorted({snapshot.folder for snapshot in plan.snapshots}):
        going = [snapshot for snapshot in plan.snapshots if snapshot.folder == folder]
        trees = cache.repos[folder].trees
        remove_snapshots(name=f"Remove {len(going)} snapshot(s) of {folder}",
                         repo=f"{config.model_cache_dir}/hub/{folder}",
                         paths=tuple(path for snapshot in going for path in snapshot.paths(snapshot.commit in trees)),
                         commits=tuple(snapshot.commit for snapshot in going), owner=cache_owner(config))
    if plan.images:
        remove_images(name=f"Remove {len(plan.images)} image(s)", ids=plan.images)


def log_plan(plan: PrunePlan, record: dict, dry: bool) -> None:
    verb = "would remove" if dry else "removes"
    host.log(f"prune: keeps {', '.join(plan.kept) or 'no release'}; {verb} "
             f"{', '.join(plan.removed) or 'no release'}")
    for env in record["envs"]:
        host.log(f"prune: {verb} env {env['id']} ({human(env['bytes'])})")
    for snapshot in plan.snapshots:
        host.log(f"prune: {verb} model {snapshot.folder}@{snapshot.commit[:12]} ({len(snapshot.blobs)} file(s), "
                 f"{human(snapshot.bytes)})")
    for image in record["images"]:
        host.log(f"prune: {verb} image {image['id'][:19]} ({'' if image['exact'] else 'up to '}"
                 f"{human(image['bytes'])} of its {human(image['size'])})")
    for note in plan.notes:
        host.log(f"prune: {note}")


def _done_steps(host_name: str) -> list[str]:
    """The steps done, in the host's prune record (made when its prune was planned, before any step runs)."""
    prune = report[host_name].prune
    assert prune is not None
    return prune["done"]


def _done(state, host, step: str) -> bool:
    """Mark STEP done in the host's report (it runs after the step's commands, only if they succeeded)."""
    _done_steps(host.name).append(step)
    return True


@operation(is_idempotent=False)
def forget_releases(releases_dir: str, ids: tuple[str, ...]):
    """The releases beyond the kept ones removed from the host (never the current one)."""
    yield program("releases.sh", "forget", releases_dir, *ids)
    yield FunctionCommand(_done, ("releases",), {})


@operation(is_idempotent=False)
def remove_envs(env_dir: str, envs: tuple[str, ...], owner: tuple[int, int]):
    """envs/<id> of ENVS removed, then the store's objects no env links to, as the env dir's owner."""
    yield as_owner(*owner, program("prune.sh", "remove", env_dir, *(f"envs/{env}" for env in envs)))
    yield as_owner(*owner, program("env_store.sh", "collect", env_dir))
    yield FunctionCommand(_done, ("envs",), {})


@operation(is_idempotent=False)
def remove_snapshots(repo: str, paths: tuple[str, ...], commits: tuple[str, ...], owner: tuple[int, int]):
    """Snapshots of one repo folder removed (each first, then its refs, tree listing and blobs), as the cache's
    owner."""
    yield as_owner(*owner, program("prune.sh", "remove", repo, *paths))
    for commit in commits:
        yield FunctionCommand(_done, (f"snapshot {commit}",), {})


class ImageRemoval(StringCommand):
    """`files/host/prune.sh remove-images`: what it removed goes to the report, and why docker kept any."""

    def __init__(self, ids: tuple[str, ...]):
        super().__init__(program("prune.sh", "remove-images", *ids))

    def execute(self, state, host, connector_arguments):
        status, output = super().execute(state, host, connector_arguments)
        record = report[host.name]
        kept = []
        for line in output.stdout_lines:
            kind, _, rest = line.partition(" ")
            image_id, _, why = rest.partition(" ")
            if kind in ("removed", "gone") and IMAGE_ID.fullmatch(image_id):
                _done_steps(host.name).append(f"image {image_id}")
            elif kind == "kept" and IMAGE_ID.fullmatch(image_id):
                kept.append(f"{image_id[:19]} ({printable(why.strip())})")
        if kept:
            record.pending = "docker kept image(s) " + ", ".join(kept)
        return status, output


@operation(is_idempotent=False)
def remove_images(ids: tuple[str, ...]):
    """The images no kept release and no container uses, `docker image rm` by id (never forced)."""
    yield ImageRemoval(ids)
