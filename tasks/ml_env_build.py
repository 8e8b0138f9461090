"""Build the ML env once per env id on a docker engine and keep the artifact in a local cache.

The engine is the control node's own or any engine its docker SDK can reach (`ssh://` or a
socket). A cached artifact whose manifest is present is never rebuilt.
"""

from __future__ import annotations

import io
import sys
import tarfile
import time
from pathlib import Path

import docker

from tasks.ml_env_artifact import ArtifactError, Manifest, repack_user_site

FILES = Path(__file__).resolve().parent.parent / "files"
BOOTSTRAP_DOCKERFILE = "Dockerfile.server.bootstrap"
LOG_TAIL = 20


def pip_conf(options: dict) -> str:
    """pip's config file for the build (the only place index credentials go)."""
    lines = ["[global]"]
    if options.get("index_url"):
        lines.append(f"index-url = {options['index_url']}")
    for key, pip_key in (("extra_index_urls", "extra-index-url"), ("find_links", "find-links"), ("trusted_hosts", "trusted-host")):
        if options.get(key):
            lines.append(f"{pip_key} = " + "\n    ".join(options[key]))
    return "\n".join(lines) + "\n"


def _tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def artifact_paths(cache_dir: Path, env: str) -> tuple[Path, Path]:
    return cache_dir / f"{env}.tar.gz", cache_dir / f"{env}.json"


def cached_manifest(cache_dir: Path, env: str) -> Manifest | None:
    artifact, manifest = artifact_paths(cache_dir, env)
    return Manifest.read(manifest) if artifact.exists() and manifest.exists() else None


def build_env(client: docker.DockerClient, env: str, base_image: str, requirements: str, pip_options: dict,
              cache_dir: Path, log=sys.stderr) -> Manifest:
    """The artifact of ENV from CACHE_DIR, built first if it is not there (progress goes to LOG)."""
    cached = cached_manifest(cache_dir, env)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"ML env {env}: building from {base_image}", file=log, flush=True)
    image, _ = client.images.build(
        path=str(FILES), dockerfile=BOOTSTRAP_DOCKERFILE, buildargs={"BASE_IMAGE": base_image},
        tag=f"mlstack-bootstrap:{env}", network_mode="none", rm=True,
    )
    container = client.containers.create(image.id, network_mode="host", labels={"mlstack.env-id": env})
    try:
        container.put_archive("/", _tar_of({"etc/pip.conf": pip_conf(pip_options).encode(),
                                            "build/requirements.txt": requirements.encode()}))
        container.start()
        tail: list[str] = []
        for line in container.logs(stream=True, follow=True):
            text = line.decode("utf-8", "replace").rstrip()
            tail = (tail + [text])[-LOG_TAIL:]
            print(f"  {text}", file=log, flush=True)
        status = container.wait()["StatusCode"]
        if status != 0:
            raise ArtifactError(f"ML env {env}: pip install failed (exit {status}):\n  " + "\n  ".join(tail))
        chunks, _ = container.get_archive("/root/.local")
        artifact, manifest_path = artifact_paths(cache_dir, env)
        manifest = repack_user_site(chunks, artifact, env, requirements)
        manifest.write(manifest_path)  # last: a manifest means the artifact is complete
    finally:
        container.remove(force=True)
    print(f"ML env {env}: {manifest.size / 1e6:.1f} MB artifact, {manifest.files} files, "
          f"built in {time.monotonic() - started:.0f}s", file=log, flush=True)
    return manifest
