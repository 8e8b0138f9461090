"""The ML env artifact: its content id, the safe repack of a built user site, and its import names.

Pure logic (no host, no engine): the deploy builds the env in a bootstrap container, streams
`/root/.local` out with the docker SDK's `get_archive`, and hands the stream to
`repack_user_site`, which writes the compressed artifact and its manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable

from packaging.utils import canonicalize_name

from ..config import requirement_names
from ..secrets import public_url
from .caches import atomic_file, atomic_write


class ArtifactError(Exception):
    """An archive or requirements file that must not be installed; the message says why."""


def recipe_id(requirements: str, base_image_id: str, platform: str, pip_options: dict) -> str:
    """What the control cache records a build under: same inputs, same id. Credentials do not count."""
    options = {
        key: [public_url(v) for v in value] if isinstance(value, list)
            else public_url(value) if isinstance(value, str) else value
        for key, value in sorted(pip_options.items())
    }
    recipe = {"requirements": requirements, "base_image": base_image_id, "platform": platform, "pip": options}
    return "recipe-" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def content_id(base_image_id: str, platform: str, python: str, distributions: list[tuple[str, str, str]]) -> str:
    """The env id: the base image it runs on and what pip installed, each distribution by name, version and
    the sha256 of its RECORD (every installed file's hash). One id, one content, on every control node."""
    content = {"base_image": base_image_id, "platform": platform, "python": python,
               "distributions": sorted(distributions)}
    return "env-" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


ENV_INFO = ".mlstack-env.json"  # inside every env: what the on-host check imports, for which Python
CUDA_RUNTIME = re.compile(r"nvidia-cuda-runtime(-cu\d+)?")  # the CUDA runtime wheel, by canonical name
TORCH_ARCH = re.compile(r"(sm|compute)_\d+[af]?")


@dataclass
class Manifest:
    env_id: str
    sha256: str
    size: int  # compressed bytes
    unpacked_size: int
    files: int
    python: str  # "python3.11": the lib/ directory of the user site
    cuda_runtime: str  # the nvidia-cuda-runtime distribution's version ("12.8.90"); "" without one
    torch: dict  # {"version", "cuda", "archs"} as the built torch reports them (TORCH_INFO); {} without torch
    imports: dict[str, list[str]] = field(default_factory=dict)  # distribution -> import names
    packages: dict[str, str] = field(default_factory=dict)  # every distribution installed -> its version

    def env_info(self) -> bytes:
        return json.dumps({"env_id": self.env_id, "python": self.python, "imports": self.imports},
                          sort_keys=True).encode()

    def write(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self), indent=2, sort_keys=True))

    def with_torch(self, info: dict) -> Manifest:
        """This manifest with what the build's files/torch_info.py printed, checked: {} or {version, cuda, archs}."""
        if info:
            version, cuda, archs = info.get("version"), info.get("cuda"), info.get("archs")
            if not (isinstance(version, str) and re.fullmatch(r"[0-9A-Za-z.+_-]{1,64}", version)
                    and (cuda is None or isinstance(cuda, str) and re.fullmatch(r"\d+\.\d+", cuda))
                    and isinstance(archs, list) and all(isinstance(a, str) and TORCH_ARCH.fullmatch(a) for a in archs)):
                raise ArtifactError(f"env {self.env_id}: torch reported {info!r}, expected "
                                    "{'version': '2.11.0', 'cuda': '13.0' or None, 'archs': ['sm_90', …]}")
            info = {"version": version, "cuda": cuda, "archs": archs}
        return replace(self, torch=info)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            fields = json.loads(path.read_text())
        except ValueError as error:
            raise ArtifactError(f"{path} is not a manifest ({error}): remove it to rebuild the env") from None
        try:
            return cls(**fields)
        except TypeError as error:
            raise StaleManifest(f"{path} is not a manifest of this version ({error}): "
                                "remove it to rebuild the env") from None


class StaleManifest(ArtifactError):
    """A manifest an older (or newer) version of the deploy wrote: it lacks what this one records."""


class _HashingWriter(io.RawIOBase):
    def __init__(self, target: BinaryIO):
        self.target, self.digest, self.size = target, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.target.write(data)


class ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (what `container.get_archive` yields)."""

    def __init__(self, chunks: Iterable[bytes]):
        self.chunks, self.pending = iter(chunks), b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            try:
                self.pending = next(self.chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size


def _escapes(name: str) -> bool:
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts


def _safe(member: tarfile.TarInfo, shown: str) -> tarfile.TarInfo:
    """MEMBER if extracting it cannot write outside the target directory, else an ArtifactError."""
    if _escapes(member.name):
        raise ArtifactError(f"archive member {shown!r} escapes the env directory")
    try:
        # The same rules as `tar.extractall(filter="data")`: no absolute or escaping links, no devices.
        return tarfile.data_filter(member, "/env")
    except tarfile.FilterError as error:
        raise ArtifactError(f"archive member {shown!r} rejected: {error}") from None


def _checked(member: tarfile.TarInfo, root: str) -> tarfile.TarInfo | None:
    """MEMBER renamed relative to the user site, owned by root, with the tar data filter's modes (no setuid,
    setgid or sticky bit, no group or other write); or an ArtifactError if it could escape it."""
    path = PurePosixPath(member.name)
    if _escapes(member.name):
        raise ArtifactError(f"archive member {member.name!r} escapes the env directory")
    if path.parts[:1] != (root,):
        raise ArtifactError(f"archive member {member.name!r} is outside {root}/")
    if len(path.parts) == 1:
        return None
    renamed = member.replace(name=str(PurePosixPath(*path.parts[1:])), uid=0, gid=0, uname="root", gname="root",
                             deep=False)
    if renamed.name == ENV_INFO:
        raise ArtifactError(f"archive member {member.name!r} would hide the env's own {ENV_INFO}")
    # The filter also drops ownership (root's, in the artifact) and leaves the modes of directories and links
    # unset: a directory gets the same rule as a file (no special bits, no group or other write).
    filtered = _safe(renamed, member.name)
    mode = renamed.mode & 0o755 if filtered.mode is None else filtered.mode
    return filtered.replace(uid=0, gid=0, uname="root", gname="root", mode=mode, deep=False)


def check_artifact(path: Path, manifest: Manifest) -> None:
    """Raise ArtifactError unless PATH is the artifact MANIFEST describes and every member is safe to extract.

    Run before an artifact leaves the control node: a cache entry may have been copied in
    from elsewhere, and hosts extract it as root.
    """
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as raw:
        for block in iter(lambda: raw.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    if (size, digest.hexdigest()) != (manifest.size, manifest.sha256):
        raise ArtifactError(f"{path} does not match its manifest (sha256 {digest.hexdigest()}, "
                            f"expected {manifest.sha256}): remove it and its .json to rebuild")
    try:
        with tarfile.open(path, mode="r|gz") as archive:
            for member in archive:
                _safe(member, member.name)
    except tarfile.TarError as error:
        raise ArtifactError(f"{path} is not a readable tar.gz: {error}") from None


def _import_names(distribution: str, top_level: list[str]) -> list[str]:
    public = sorted({name for name in top_level if name and not name.startswith("_")})
    own = distribution.replace("-", "_")
    return [own] if own in public else public


def _top_level_from_record(record: str) -> list[str]:
    names = set()
    for line in record.splitlines():
        first = line.split(",", 1)[0].split("/", 1)
        if len(first) == 2 and not re.search(r"\.(dist-info|data)$|^__pycache__$|^\.\.$", first[0]):
            names.add(first[0])
        elif len(first) == 1 and first[0].endswith(".py"):
            names.add(first[0][:-3])
    return sorted(names)


def repack_user_site(chunks: Iterable[bytes], cache_dir: Path, requirements: str, base_image_id: str,
                     platform: str) -> Manifest:
    """Turn `get_archive('/root/.local')` into CACHE_DIR/<env id>.tar.gz (a tar.gz of the user site's content,
    named by what it holds: `content_id`); return its manifest.

    Every member is checked before anything is written; the artifact is written whole or not at all.
    """
    wanted = set(requirement_names(requirements))
    metadata: dict[str, dict[str, str]] = {}
    unpacked = files = 0
    manifest: Manifest | None = None

    def artifact_name() -> str:  # asked once the artifact is whole: its manifest is made by then
        assert manifest is not None
        return f"{manifest.env_id}.tar.gz"

    with atomic_file(cache_dir / "artifact.tar.gz", name=artifact_name) as raw, \
            _HashingWriter(raw) as hashing:
        with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=1, mtime=0) as compressed:
            with tarfile.open(fileobj=ChunkReader(chunks), mode="r|") as source, \
                    tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as out:
                root, pythons = None, set()
                for member in source:
                    root = root or PurePosixPath(member.name).parts[0]
                    renamed = _checked(member, root)
                    if renamed is None:
                        continue
                    data = source.extractfile(member) if member.isfile() else None
                    if data is not None and re.search(r"\.dist-info/(METADATA|top_level\.txt|RECORD)$", renamed.name):
                        content = data.read()
                        dist_dir, kind = renamed.name.rsplit("/", 1)
                        metadata.setdefault(dist_dir, {})[kind] = content.decode("utf-8", "replace")
                        data = io.BytesIO(content)
                    out.addfile(renamed, data)
                    unpacked += renamed.size
                    files += renamed.isfile()
                    pythons.update(re.findall(r"^lib/(python3\.\d+)/", renamed.name))
                manifest = _manifest(metadata, wanted, pythons, unpacked, files, base_image_id, platform)
                info = tarfile.TarInfo(ENV_INFO)
                info.size, info.mode, info.uname, info.gname = len(manifest.env_info()), 0o644, "root", "root"
                out.addfile(info, io.BytesIO(manifest.env_info()))
        manifest.size, manifest.sha256 = hashing.size, hashing.digest.hexdigest()
    return manifest


def _distribution(found: dict[str, str]) -> tuple[str, str] | None:
    """The canonical name and version a dist-info's METADATA gives, or None."""
    name = re.search(r"^Name:\s*(\S+)", found.get("METADATA", ""), flags=re.M)
    version = re.search(r"^Version:\s*(\S+)\s*$", found.get("METADATA", ""), flags=re.M)
    return (canonicalize_name(name.group(1)), version.group(1)) if name and version else None


def _manifest(metadata: dict[str, dict[str, str]], wanted: set[str], pythons: set[str], unpacked: int, files: int,
              base_image_id: str, platform: str) -> Manifest:
    imports, packages, records, cuda_runtime = {}, {}, [], ""
    for found in metadata.values():
        distribution = _distribution(found)
        if distribution is None:
            continue
        name, version = distribution
        packages[name] = version
        records.append((name, version, hashlib.sha256(found.get("RECORD", "").encode()).hexdigest()))
        if CUDA_RUNTIME.fullmatch(name) and re.fullmatch(r"\d+(\.\d+)+", version):
            cuda_runtime = version
        if name in wanted:
            top_level = found.get("top_level.txt", "").split() or _top_level_from_record(found.get("RECORD", ""))
            imports[name] = _import_names(name, top_level)
    missing = sorted(wanted - set(imports))
    if missing:
        raise ArtifactError(f"the built env lacks {', '.join(missing)} (no dist-info found): "
                            "the build did not install them")
    if len(pythons) != 1:
        raise ArtifactError(f"the built env has site-packages for {sorted(pythons) or 'no Python'}: "
                            "expected exactly one lib/python3.X")
    python = pythons.pop()
    return Manifest(content_id(base_image_id, platform, python, records), "", 0, unpacked, files, python,
                    cuda_runtime, {}, dict(sorted(imports.items())), dict(sorted(packages.items())))
