"""The fan-out's kit: what a host needs to run a peer of the swarm beyond the runtime image it already has, the
peer program (`files/host/swarm_peer.py`) and libtorrent's package as this control node runs it (installed from
requirements.lock, checked against its hashes). Made once per control node as a reproducible tar.gz, named by
its sha256, and sent once to each host (tasks/host/fanout.py `KitUpload`), which checks it before unpacking.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..paths import FILES
from .caches import atomic_write, once

PEER = FILES / "host" / "swarm_peer.py"


@dataclass(frozen=True)
class Kit:
    id: str  # the first 16 hex digits of its sha256: the name of its folder on hosts
    sha256: str
    archive: Path


def _members() -> list[tuple[str, Path]]:
    import libtorrent  # only where a fan-out is planned

    package = Path(libtorrent.__file__).parent
    files = sorted(path for path in package.rglob("*") if path.is_file() and "__pycache__" not in path.parts)
    return [("swarm_peer.py", PEER), *((f"libtorrent/{path.relative_to(package)}", path) for path in files)]


def _archive() -> bytes:
    """The kit's tar.gz: the same bytes for the same files (no times, owners or order of the file system)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in _members():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with path.open("rb") as data:
                tar.addfile(info, data)
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def kit_for(cache_dir: Path) -> Kit:
    """This control node's kit, made once below CACHE_DIR (`ml_env_cache_dir`)."""
    def make() -> Kit:
        data = _archive()
        sha256 = hashlib.sha256(data).hexdigest()
        archive = cache_dir / "swarm-kit" / f"{sha256}.tar.gz"
        if not archive.exists():
            archive.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(archive, data)
        return Kit(sha256[:16], sha256, archive)

    return once(("swarm-kit", cache_dir), make)
