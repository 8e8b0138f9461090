"""The control node's caches trimmed to what the hosts still need (`mlstack prune`, once every targeted host
answered): from each host's report, the envs it keeps, its kept releases' model commits (in the folders its
releases name) and images (tasks/prune.py `needs`), merged over the hosts.

- `ml_env_cache_dir`: for each env id no host keeps, its artifact and manifest (`<env>.tar.gz`, `<env>.json`), its
  tree (`trees/<env>.json`), the recipe records that name it (`recipes/<recipe>.json`: the recipe is built again
  if a deploy asks for it) and the objects only such envs' trees use; the base image records stay.
- `image_cache_dir`: the archives of built and shipped images (`<project>-<16 hex>.tar.gz`,
  `pulled-<16 hex>.tar.gz`, and the partial copies made from them, `<archive>-without-<16 hex>.tar.gz`) of
  images no kept release runs; the runtime base image's archives (`base-…`) and the .env salt stay.
- `hf_control_cache_dir`: only in the folders some release names: each `snapshots/<commit>` no kept release
  uses, the refs naming it, its tree listing (`trees/<commit>.json`, also of commits with no snapshot) and the
  blobs only removed snapshots link to.

Only names these caches write are considered; anything else in them is left as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ENV_ID
from .env_store import read_tree, tree_objects

STEM = re.compile(r"[a-z0-9][a-z0-9_.-]*-[0-9a-f]{16}")  # a built (`<project>-<tag>`) or shipped image's archive
ARCHIVE = re.compile(rf"({STEM.pattern})\.tar\.gz")
PARTIAL = re.compile(r"(.+)-without-[0-9a-f]{16}\.tar\.gz")  # a copy of an archive without the layers a host held
SHIPPED = re.compile(r"\S+ \(([0-9a-f]{12})\)")  # a shipped image's label: "reference (digest's first 12)"
COMMIT = re.compile(r"[0-9a-f]{40}")  # as tasks/control/hub.py (not imported: `mlstack prune` starts without it)
BLOB = re.compile(r"(?:\.\./)+blobs/([0-9a-f]{40}(?:[0-9a-f]{24})?)")


@dataclass(frozen=True)
class Trim:
    cache: str  # "ml_env", "images" or "hf"
    what: str  # what people read: "env env-…", "archive mlstack-reranker-….tar.gz", "model models--…@0123…"
    paths: tuple[Path, ...] = field(repr=False)
    bytes: int = 0
    detail: str = ""  # what else goes with it: "tree, 2 recipe records, 412 objects"


@dataclass
class Needs:
    """What the hosts still need, merged: env ids, image labels, and per model folder the commits."""

    envs: set[str] = field(default_factory=set)
    images: set[str] = field(default_factory=set)
    models: dict[str, set[str]] = field(default_factory=dict)  # every folder some release names -> kept commits

    @classmethod
    def merged(cls, records: list[dict]) -> Needs:
        needs = cls()
        for record in records:
            needs.envs.update(record.get("envs", []))
            needs.images.update(record.get("images", []))
            for folder in record.get("folders", []):
                needs.models.setdefault(folder, set()).update(record.get("models", {}).get(folder, []))
        return needs


def size_of(paths: list[Path]) -> int:
    """Bytes of the files at PATHS and below them (links not followed)."""
    total = 0
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            total += sum((Path(root) / name).lstat().st_size for root, _, names in os.walk(path) for name in names)
        elif path.exists() or path.is_symlink():
            total += path.lstat().st_size
    return total


def env_cache_trims(cache_dir: Path, keep: set[str]) -> list[Trim]:
    """The env ids of the cache no host keeps, each with its files and the objects only the envs that go use."""
    if not cache_dir.is_dir():
        return []
    names = [path.name for path in cache_dir.iterdir()] + [f"{path.stem}.json" for path in
                                                            (cache_dir / "trees").glob("env-*.json")]
    present = {name.split(".", 1)[0] for name in names if ENV_ID.fullmatch(name.split(".", 1)[0])}
    going = sorted(present - keep)
    if not going:
        return []
    staying: set[str] = set()
    for env in present - set(going):
        staying.update(tree_objects(read_tree(cache_dir, env) or {}))
    recipes: dict[str, list[Path]] = {}
    for record in sorted((cache_dir / "recipes").glob("recipe-*.json")):
        try:
            env = json.loads(record.read_text()).get("env")
        except (OSError, ValueError, AttributeError):
            continue
        if env in going:
            recipes.setdefault(env, []).append(record)
    trims: list[Trim] = []
    counted: set[str] = set()
    for env in going:
        objects = sorted(set(tree_objects(read_tree(cache_dir, env) or {})) - staying - counted)
        counted.update(objects)
        # in the order they go: the tree first (it is written last, once its objects are there), the artifact last
        named = {"tree": cache_dir / "trees" / f"{env}.json", "manifest": cache_dir / f"{env}.json",
                 "artifact": cache_dir / f"{env}.tar.gz"}
        stored = [path for name in objects if (path := cache_dir / "objects" / name).exists()]
        paths = [named["tree"], *recipes.get(env, []), *stored, named["manifest"], named["artifact"]]
        paths = [path for path in paths if path.exists()]
        detail = [name for name in ("artifact", "manifest", "tree") if named[name].exists()]
        detail += [f"{len(recipes[env])} recipe record(s)"] if env in recipes else []
        detail += [f"{len(stored)} object(s)"] if stored else []
        trims.append(Trim("ml_env", f"env {env}", tuple(paths), size_of(paths), ", ".join(detail)))
    return trims


def kept_archive_stems(images: set[str]) -> tuple[set[str], set[str]]:
    """(archive stems, shipped digest prefixes) the kept releases' image labels name."""
    stems, shipped = set(), set()
    for label in images:
        match = SHIPPED.fullmatch(label)
        if match:
            shipped.add(f"pulled-{match.group(1)}")
        else:
            stems.add(label.replace(":", "-"))
    return stems, shipped


def image_cache_trims(cache_dir: Path, images: set[str]) -> list[Trim]:
    """The image archives (and their partial copies) of images no kept release runs."""
    if not cache_dir.is_dir():
        return []
    stems, shipped = kept_archive_stems(images)
    found: dict[str, list[Path]] = {}
    for path in sorted(cache_dir.iterdir()):
        partial, whole = PARTIAL.fullmatch(path.name), ARCHIVE.fullmatch(path.name)
        stem = partial.group(1) if partial and STEM.fullmatch(partial.group(1)) else whole.group(1) if whole else None
        if stem is not None and path.is_file() and not path.is_symlink():
            found.setdefault(stem, []).append(path)
    trims = []
    for stem, paths in sorted(found.items()):
        if stem.startswith("base-") or stem in stems or any(stem.startswith(prefix) for prefix in shipped):
            continue
        archive = cache_dir / f"{stem}.tar.gz"
        ordered = [*(path for path in paths if path != archive), *(path for path in paths if path == archive)]
        copies = len(paths) - (archive in paths)
        trims.append(Trim("images", f"archive {stem}.tar.gz", tuple(ordered), size_of(ordered),
                          f"and {copies} partial cop{'y' if copies == 1 else 'ies'}" if copies else ""))
    return trims


def snapshot_links(snapshot: Path) -> set[str]:
    """The blobs a snapshot directory's links lead to (walked without following a link)."""
    blobs = set()
    for root, _, names in os.walk(snapshot):
        for name in names:
            path = Path(root) / name
            if path.is_symlink():
                depth = len(path.relative_to(snapshot).parts) - 1
                target = os.readlink(path)
                match = BLOB.fullmatch(target)
                if match and target.count("../") == 2 + depth:
                    blobs.add(match.group(1))
    return blobs


def hf_cache_trims(cache_dir: Path, models: dict[str, set[str]]) -> list[Trim]:
    """In each folder some release names, the snapshots (and tree listings) no kept release uses."""
    trims = []
    for folder, keep in sorted(models.items()):
        repo = cache_dir / folder
        if not repo.is_dir() or repo.is_symlink():
            continue
        snapshots = {path.name for path in (repo / "snapshots").glob("*") if COMMIT.fullmatch(path.name)
                     and path.is_dir() and not path.is_symlink()}
        listings = {path.stem for path in (repo / "trees").glob("*.json") if COMMIT.fullmatch(path.stem)}
        going = sorted((snapshots | listings) - keep)
        if not going:
            continue
        staying = set().union(*(snapshot_links(repo / "snapshots" / commit) for commit in snapshots - set(going)))
        refs: dict[str, list[Path]] = {}
        for ref in (repo / "refs").rglob("*") if (repo / "refs").is_dir() else []:
            if ref.is_file() and not ref.is_symlink():
                refs.setdefault(ref.read_text(errors="replace").strip(), []).append(ref)
        counted: set[str] = set()
        for commit in going:
            blobs = sorted(snapshot_links(repo / "snapshots" / commit) - staying - counted) if commit in snapshots \
                else []
            counted.update(blobs)
            paths = [path for path in (repo / "snapshots" / commit, *refs.get(commit, []),
                                       repo / "trees" / f"{commit}.json", repo / ".no_exist" / commit,
                                       *(repo / "blobs" / blob for blob in blobs)) if path.exists()]
            detail = (f"{len(blobs)} file(s)" if commit in snapshots else "tree listing only")
            trims.append(Trim("hf", f"model {folder}@{commit[:12]}", tuple(paths), size_of(paths), detail))
    return trims


def plan_trims(caches: dict[str, set[Path]], needs: Needs) -> list[Trim]:
    """Every trim of every cache directory the hosts use (`caches`: "ml_env", "images", "hf" -> directories)."""
    trims = []
    for cache_dir in sorted(caches.get("ml_env", ())):
        trims += env_cache_trims(cache_dir, needs.envs)
    for cache_dir in sorted(caches.get("images", ())):
        trims += image_cache_trims(cache_dir, needs.images)
    for cache_dir in sorted(caches.get("hf", ())):
        trims += hf_cache_trims(cache_dir, needs.models)
    return trims


def apply_trims(trims: list[Trim]) -> list[str]:
    """Remove what TRIMS name, each in the order given (a trim cut short never leaves a tree without its
    objects, a manifest without its artifact or a snapshot without its blobs); the problems met, if any."""
    problems = []
    for trim in trims:
        for path in trim.paths:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as error:
                problems.append(f"{trim.what}: {path}: {error.strerror or error}")
    return problems
