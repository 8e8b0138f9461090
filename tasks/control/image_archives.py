"""Image archives in the control cache: `docker save | gzip` written atomically, the layers an archive holds
(by chain id), and an archive without the layers a host already holds.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
import sys
import tarfile
from pathlib import Path
from typing import IO, NamedTuple

from .builder import BaseImage, builder_engine, require_base
from .caches import atomic_file
from .compose_project import StackError


def save_base_image(base: BaseImage, builder: str, archive: Path) -> Path:
    """`docker save | gzip` of the runtime base image, the very id the env was built on (the builder's BASE.ref
    must still be BASE.id), kept in the control cache by that id; `docker load` on a host tags it BASE.ref."""
    if archive.exists():
        return archive
    with builder_engine(builder, f"saving the base image {base.ref!r} failed") as client:
        require_base(client, builder, base)
        save_archive(client, base.ref, archive)
    return archive


def save_archive(client, name: str, archive: Path) -> None:
    """`docker save NAME | gzip` into ARCHIVE, written atomically; NAME is the tag `docker load` restores."""
    with atomic_file(archive) as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out:
        for chunk in client.images.get(name).save(named=name):
            out.write(chunk)
    print(f"image {name}: {archive.stat().st_size / 1e6:.1f} MB archive", file=sys.stderr, flush=True)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain id of each layer of an image whose layers are DIFF_IDS in order: what names a layer in
    an engine's store together with every layer below it (the OCI image spec's ChainID)."""
    chains: list[str] = []
    for diff_id in diff_ids:
        chains.append(diff_id if not chains else
                      "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest())
    return chains


class SavedLayer(NamedTuple):
    member: str  # the layer's file, as the archive's manifest.json names it
    chain: str  # its chain id
    reads: tuple[str, ...]  # what reading MEMBER goes through: MEMBER, then where each link leads (docker 20.10
    # saves a layer that repeats, the empty one, as a link to its first copy)


def archive_layers(archive: Path) -> list[SavedLayer]:
    """Each layer of the one image in ARCHIVE (`docker save | gzip`), read from its manifest.json and image
    config."""
    try:
        with tarfile.open(archive, "r:gz") as saved:  # a member read after the index was made: a second pass
            (manifest,) = json.load(_member(saved, "manifest.json"))
            diff_ids = json.load(_member(saved, manifest["Config"]))["rootfs"]["diff_ids"]
            return [SavedLayer(name, chain, _reads(saved, name))
                    for name, chain in zip(manifest["Layers"], chain_ids(diff_ids), strict=True)]
    except (KeyError, ValueError, TypeError, AttributeError, tarfile.TarError) as error:  # AttributeError: a
        # "Config" that is no string, which tarfile takes for a member
        raise StackError(f"{archive}: not the `docker save` of one image ({error!r}): remove it to save it "
                         "again") from error


def _reads(saved: tarfile.TarFile, name: str) -> tuple[str, ...]:
    """NAME, then each member its links lead to (a symlink's target is relative to its directory, a hard
    link's to the archive's root), up to a regular file; KeyError where one is missing or links loop."""
    path = [name]
    while len(path) <= 8:
        member = saved.getmember(path[-1])
        if member.issym():
            path.append(posixpath.normpath(posixpath.join(posixpath.dirname(member.name), member.linkname)))
        elif member.islnk():
            path.append(member.linkname)
        else:
            return tuple(path)
    raise KeyError(f"{name!r}: more than 8 links")


def needless_layers(layers: list[SavedLayer], held: frozenset[str]) -> tuple[str, ...]:
    """The layer files of an archive whose layers are LAYERS that a host holding the layers HELD (chain ids) can
    do without: `docker load` reads none of the layers it holds, but a file stays while a layer the host lacks
    reads it, by its name (docker 25 names a repeated layer's one blob again) or through a link."""
    needed = {name for layer in layers if layer.chain not in held for name in layer.reads}
    return tuple(sorted({layer.member for layer in layers if layer.chain in held} - needed))


def _member(saved: tarfile.TarFile, name: str) -> IO[bytes]:
    """The file NAME of SAVED; KeyError where there is none, or where NAME is not a regular file."""
    member = saved.extractfile(name)
    if member is None:
        raise KeyError(f"{name!r} is not a file")
    return member


def partial_archive(archive: Path, leave_out: tuple[str, ...]) -> Path:
    """ARCHIVE without the layer files LEAVE_OUT names, kept beside it: `docker load` with the classic
    image store reads no layer it already holds (by chain id), so a host that holds those gets only
    the rest."""
    key = hashlib.sha256("\0".join(leave_out).encode()).hexdigest()[:16]
    partial = archive.with_name(f"{archive.name.removesuffix('.tar.gz')}-without-{key}.tar.gz")
    if partial.exists():
        return partial
    with tarfile.open(archive, "r:gz") as saved, atomic_file(partial) as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as compressed, \
            tarfile.open(fileobj=compressed, mode="w|") as out:
        for member in saved:
            if member.name not in leave_out:
                out.addfile(member, saved.extractfile(member) if member.isfile() else None)
    return partial
