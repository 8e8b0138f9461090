"""The rehearsal's base image: Debian from debootstrap, packed once as a `docker load` archive.

Docker Hub is out of reach, so the image is built from Debian's packages. The archive is written
in the `docker save` format by hand (one layer, a fixed config), so every host that loads it gets
the same image id — the id later capabilities hash into their artifact ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from rehearsal.prereqs import machine_mirror

CACHE_DIR = Path("/var/cache/mlstack-rehearsal")
IMAGE_NAME = "mlstack-base:bookworm"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates", "curl")
# Trimmed after debootstrap: documentation and apt indexes nobody reads inside a container.
PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists", "var/cache/apt")
CONFIG_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]


def archive_key() -> str:
    recipe = json.dumps({"suite": SUITE, "packages": PACKAGES, "prune": PRUNE, "env": CONFIG_ENV, "v": 1})
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def archive_path() -> Path:
    return CACHE_DIR / f"base-{SUITE}-{archive_key()}.tar"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def image_config(layer_digest: str) -> bytes:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": {"Env": CONFIG_ENV, "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": f"debootstrap --variant=minbase {SUITE}"}],
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def write_image_archive(rootfs: Path, target: Path) -> str:
    """Pack ROOTFS as a one-layer image archive at TARGET; return the image id."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".layer-") as tmp:
        layer = Path(tmp) / "layer.tar"
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(layer), "."], check=True)
        layer_digest = _sha256_file(layer)
        config = image_config(layer_digest)
        image_id = hashlib.sha256(config).hexdigest()
        manifest = [{"Config": f"{image_id}.json", "RepoTags": [IMAGE_NAME], "Layers": [f"{layer_digest}/layer.tar"]}]
        partial = target.with_name(target.name + ".partial")
        with tarfile.open(partial, "w") as archive:
            archive.add(layer, arcname=f"{layer_digest}/layer.tar")
            _add_bytes(archive, f"{image_id}.json", config)
            _add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
        partial.rename(target)
    return image_id


def image_id_of(archive_file: Path) -> str:
    with tarfile.open(archive_file) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))
    return manifest[0]["Config"].removesuffix(".json")


def ensure_archive() -> Path:
    """The cached base image archive, built with debootstrap on first use (about a minute)."""
    target = archive_path()
    if target.exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"base image: debootstrap {SUITE} with {', '.join(PACKAGES)} (once per machine)...", flush=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix=".rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(rootfs),
             machine_mirror()],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for relative in PRUNE:
            shutil.rmtree(rootfs / relative, ignore_errors=True)
        image_id = write_image_archive(rootfs, target)
    print(f"base image: {IMAGE_NAME} {image_id[:12]} cached in {target} ({time.monotonic() - started:.0f}s)",
          flush=True)
    return target
