"""The env store on the control side: each env as a tree of entries over objects (file contents by sha256
and mode), and what one host must be sent to hold a new env.

On the control node, below `ml_env_cache_dir`:

    objects/<sha256>-<mode>   every file of every env the cache holds, once (unpacked from the artifacts)
    trees/<env>.json          the env's entries in artifact order: path -> (kind, mode, object or link target)

A host's store (tasks/host/ml_env.py) has the same objects/ and one hard-link tree per env. A new env
is made on the host from this manifest alone, every entry of it (never from a copy of another env's
tree, which could carry what was planted there); only objects the host lacks travel. A tree that differs
from its manifest (`tree_drift`) is mended in place from the same stream. The stream `transfer_stream`
writes is three parts (files/host/env_store.sh receive or mend reads the first two with `head -c`, and its
tar the third to the end):

    1. the paths to remove (those that differ, when mending): NUL-separated, gzip
    2. the entries to add: a tar.gz of directories, hard links to `objects/<object>` and symlinks
    3. the objects to send: a tar of `<object>` members (short names: no extended headers)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Callable, Iterator, NamedTuple

from .caches import atomic_write, once
from .env_artifact import ArtifactError, ChunkReader

OBJECT = re.compile(r"[0-9a-f]{64}-[0-7]{3,4}")
BLOCK = 512
STAMP = 1577836800  # every object's and directory's mtime on hosts (2020-01-01): content, not time, names them


class Entry(NamedTuple):
    kind: str  # "d" directory, "f" file, "l" symlink
    mode: int
    ref: str  # a file's object, a symlink's target, "" for a directory
    size: int = 0


Tree = dict[str, Entry]  # path (relative to the env root) -> entry, parents before children


def object_name(sha256: str, mode: int) -> str:
    """A file's content and mode: hard links share both, so both name the object."""
    return f"{sha256}-{mode:03o}"


def _trees(cache_dir: Path) -> Path:
    return cache_dir / "trees"


def _objects(cache_dir: Path) -> Path:
    return cache_dir / "objects"


def read_tree(cache_dir: Path, env: str) -> Tree | None:
    """ENV's tree as unpacked on this control node, or None."""
    try:
        entries = json.loads((_trees(cache_dir) / f"{env}.json").read_text())["entries"]
        return {path: Entry(kind, mode, ref, size) for path, kind, mode, ref, size in entries}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def env_tree(cache_dir: Path, env: str, artifact: Path) -> Tree:
    """ENV's tree, its objects unpacked from ARTIFACT (checked before: `EnvSource.ensure`) once per control
    node: the tree file is written last, so a tree on disk means every object it names was written (an
    object a crash left short is caught before it is sent: `check_objects`)."""
    return once(("tree", env, cache_dir), lambda: read_tree(cache_dir, env) or _unpack(cache_dir, env, artifact))


def _unpack(cache_dir: Path, env: str, artifact: Path) -> Tree:
    objects = _objects(cache_dir)
    objects.mkdir(parents=True, exist_ok=True)
    tree: Tree = {}
    try:
        with tarfile.open(artifact, mode="r|gz") as archive:
            for member in archive:
                if member.isdir():
                    tree[member.name] = Entry("d", member.mode & 0o7777, "")
                elif member.issym():
                    tree[member.name] = Entry("l", 0o777, member.linkname)
                elif member.islnk():
                    tree[member.name] = tree[member.linkname]
                elif member.isfile():
                    mode = member.mode & 0o7777
                    content = archive.extractfile(member)
                    if content is None:  # a regular file always has content: a tar that says otherwise is broken
                        raise tarfile.TarError(f"{member.name}: no content")
                    digest = _store(objects, content, mode)
                    tree[member.name] = Entry("f", mode, object_name(digest, mode), member.size)
    except (tarfile.TarError, KeyError) as error:
        raise ArtifactError(f"{artifact} cannot be unpacked into the env store: {error}") from None
    atomic_write(_trees(cache_dir) / f"{env}.json",
                 json.dumps({"entries": [[path, *entry] for path, entry in tree.items()]}))
    return tree


def _store(objects: Path, data: IO[bytes], mode: int) -> str:
    """DATA as an object of OBJECTS (kept if one of that content is there); its sha256."""
    descriptor, temporary = tempfile.mkstemp(prefix=".object.", suffix=".partial", dir=objects)
    try:
        digest = hashlib.sha256()
        with os.fdopen(descriptor, "wb") as out:
            while block := data.read(1 << 20):
                digest.update(block)
                out.write(block)
        target = objects / object_name(digest.hexdigest(), mode)
        if target.exists():
            os.unlink(temporary)
        else:
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
        return digest.hexdigest()
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def tree_objects(tree: Tree) -> dict[str, int]:
    """Every object TREE's files use, with its size."""
    return {entry.ref: entry.size for entry in tree.values() if entry.kind == "f"}


@dataclass(frozen=True)
class Transfer:
    """What makes NEW on a host, or mends a tree of it there: the paths to remove, the entries to add, and the
    objects to send (those the added files use and the host lacks), each once."""

    remove: tuple[str, ...]
    add: tuple[tuple[str, Entry], ...]
    send: tuple[tuple[str, int], ...]  # (object, size)

    @property
    def object_bytes(self) -> int:
        return sum(size for _, size in self.send)


def plan_transfer(new: Tree, present: set[str], held: Tree | None = None) -> Transfer:
    """The Transfer to a host that holds PRESENT objects: NEW made from nothing, or the host's tree HELD (as
    `host_tree` reads it) mended into NEW."""
    held = held or {}
    remove = tuple(path for path, entry in held.items()
                   if path not in new or new[path].kind != entry.kind or (entry.kind != "d" and new[path] != entry))
    add = tuple((path, entry) for path, entry in new.items() if held.get(path) != entry)
    send = {entry.ref: entry.size for _, entry in add if entry.kind == "f" and entry.ref not in present}
    return Transfer(remove, add, tuple(send.items()))


Listing = dict[str, tuple[str, str]]  # a tree as a host lists it: path -> (kind, object or link target)


def host_tree(manifest: Tree, listing: Listing) -> Tree:
    """LISTING as entries comparable with MANIFEST's: a directory, or a file that is the manifest's object, is
    the manifest's entry; anything else is an entry no manifest has (kind "f" of another object, "l" of its
    target, or another kind of file: "p", "s", "?" for a file no object is)."""
    tree: Tree = {}
    for path, (kind, ref) in listing.items():
        wanted = manifest.get(path)
        same = wanted is not None and wanted.kind == kind and (kind == "d" or wanted.ref == ref)
        tree[path] = wanted if same and wanted is not None else Entry(kind, 0, ref)
    return tree


class TreeDrift(NamedTuple):
    extra: tuple[str, ...]  # on the host, not in the manifest
    missing: tuple[str, ...]  # in the manifest, not on the host
    changed: tuple[str, ...]  # on both, another kind, object or link target

    def summary(self) -> str:
        parts = [f"{len(paths)} {word} ({', '.join(paths[:3])}{', …' if len(paths) > 3 else ''})"
                 for word, paths in zip(self._fields, self, strict=True) if paths]
        return "; ".join(parts)


def tree_drift(manifest: Tree, held: Tree) -> TreeDrift:
    """How the host's tree HELD (`host_tree`) differs from MANIFEST."""
    return TreeDrift(tuple(path for path in held if path not in manifest),
                     tuple(path for path in manifest if path not in held),
                     tuple(path for path, entry in held.items() if path in manifest and manifest[path] != entry))


def _header(info: tarfile.TarInfo) -> bytes:
    info.mtime, info.uid, info.gid, info.uname, info.gname = STAMP, 0, 0, "root", "root"
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


@dataclass(frozen=True)
class Stream:
    """Bytes made as they are sent, and how many there will be."""

    chunks: Callable[[], Iterator[bytes]]
    size: int

    def open(self) -> tuple[BinaryIO, int]:
        return io.BufferedReader(ChunkReader(self.chunks()), 1 << 20), self.size


def objects_tar(cache_dir: Path, send: tuple[tuple[str, int], ...]) -> Stream:
    """A tar of the control cache's objects SEND, each named by its object name and with its mode."""
    def chunks() -> Iterator[bytes]:
        for name, size in send:
            info = tarfile.TarInfo(name)
            info.size, info.mode = size, int(name.rsplit("-", 1)[1], 8)
            yield _header(info)
            with (_objects(cache_dir) / name).open("rb") as data:
                while block := data.read(1 << 20):
                    yield block
            yield _padding(size)
        yield b"\0" * (2 * BLOCK)

    return Stream(chunks, sum(BLOCK + size + (-size % BLOCK) for _, size in send) + 2 * BLOCK)


def transfer_stream(transfer: Transfer, tree: str, cache_dir: Path) -> tuple[Stream, tuple[int, int]]:
    """TRANSFER as the stream `env_store.sh receive` or `mend` reads, its entries under TREE (envs/<env>.tmp-<mark>
    or envs/<env>); and the sizes of its first two parts (the objects, the bulk, are read to the end)."""
    removals = _gzip(b"".join(path.encode("utf-8", "surrogateescape") + b"\0" for path in transfer.remove))
    entries = io.BytesIO()
    for path, entry in transfer.add:
        info = tarfile.TarInfo(f"{tree}/{path}")
        if entry.kind == "d":
            info.type, info.mode = tarfile.DIRTYPE, entry.mode
        elif entry.kind == "l":
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.ref, 0o777
        else:
            info.type, info.linkname, info.mode = tarfile.LNKTYPE, f"objects/{entry.ref}", entry.mode
        entries.write(_header(info))
    entries.write(b"\0" * (2 * BLOCK))
    tree_part = _gzip(entries.getvalue())
    objects = objects_tar(cache_dir, transfer.send)

    def chunks() -> Iterator[bytes]:
        yield removals
        yield tree_part
        yield from objects.chunks()

    return Stream(chunks, len(removals) + len(tree_part) + objects.size), (len(removals), len(tree_part))


def check_objects(cache_dir: Path, names: list[str]) -> None:
    """Raise ArtifactError unless every object of NAMES in the control cache holds what its name says
    (each checked once per deploy): checked before a byte of it is sent."""
    for name in names:
        once(("object", name, cache_dir), lambda name=name: _check_object(cache_dir, name))


def _check_object(cache_dir: Path, name: str) -> None:
    path = _objects(cache_dir) / name
    try:
        with path.open("rb") as data:
            digest = hashlib.file_digest(data, "sha256").hexdigest()
    except OSError as error:
        raise ArtifactError(f"the control cache's env object {path} cannot be read ({error}): remove "
                            f"{_trees(cache_dir)} to unpack the envs again") from None
    if not name.startswith(digest):
        raise ArtifactError(f"the control cache's env object {path} is damaged (sha256 {digest}): remove it and "
                            f"{_trees(cache_dir)} to unpack the envs again")
