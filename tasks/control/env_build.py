"""The ML env on the control side: built once per env id on the builder, kept as an artifact in the
control cache (`ml_env_cache_dir`), checked before a byte of it is sent.

A cached artifact whose manifest is present is never rebuilt. Hosts are told which env to run by
`env_source`: the pinned `ml_env_id`, or the id `ml_env_requirements` make on the runtime base image.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import secrets
from tasks.config import FILES, HostConfig, read_requirements
from tasks.control.builder import BaseImage, builder_engine, known_base_image, probe_base_image, require_base, tar_of
from tasks.control.caches import once
from tasks.control.env_artifact import (
    ArtifactError,
    Manifest,
    StaleManifest,
    check_artifact,
    env_id,
    repack_user_site,
)

if TYPE_CHECKING:
    import docker

BOOTSTRAP_DOCKERFILE = "Dockerfile.server.bootstrap"
BUILD_PROGRAMS = ("env_build.sh", "torch_info.py")  # what the bootstrap container runs (files/)
LOG_TAIL = 20


def pip_conf(options: dict) -> str:
    """pip's config file for the build: the only place index credentials are ever written."""
    lines = ["[global]"]
    if options.get("index_url"):
        lines.append(f"index-url = {secrets.expand(options['index_url'])}")
    for key, pip_key in (("extra_index_urls", "extra-index-url"), ("find_links", "find-links"),
                         ("trusted_hosts", "trusted-host")):
        if options.get(key):
            lines.append(f"{pip_key} = " + "\n    ".join(secrets.expand(value) for value in options[key]))
    return "\n".join(lines) + "\n"


def shown_pip_line(text: str, options: dict) -> str:
    """A line of pip's output as it may be shown: the value of every `${VAR}` of the index settings masked
    wherever pip prints it (pip masks a URL's password itself, but not a token in its path or query)."""
    for template in [options.get("index_url") or "", *(options.get("extra_index_urls") or ()),
                     *(options.get("find_links") or ())]:
        text = secrets.scrubbed(text, template)
    return text


def artifact_paths(cache_dir: Path, env: str) -> tuple[Path, Path]:
    return cache_dir / f"{env}.tar.gz", cache_dir / f"{env}.json"


def cached_manifest(cache_dir: Path, env: str) -> Manifest | None:
    """ENV's manifest in the control cache, or None. One another version of the deploy wrote counts as
    absent: the env is built again (from its recipe) and gets what this version records, such as its CUDA."""
    artifact, manifest = artifact_paths(cache_dir, env)
    if not (artifact.exists() and manifest.exists()):
        return None
    try:
        return Manifest.read(manifest)
    except StaleManifest:
        return None


def _read_torch_info(container, env: str) -> dict:
    """What files/torch_info.py wrote in the finished build container: {} or torch's version, CUDA and archs."""
    chunks, _ = container.get_archive("/build/torch.json")
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
        member = archive.next()
        data = archive.extractfile(member).read() if member is not None and member.isfile() else b""
    try:
        info = json.loads(data)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise ArtifactError(f"ML env {env}: the build's torch report is not a JSON object: {data[:200]!r}")
    return info


def build_env(client: docker.DockerClient, env: str, base_image: str, requirements: str, pip_options: dict,
              cache_dir: Path, log=sys.stderr) -> Manifest:
    """The artifact of ENV from CACHE_DIR, built first if it is not there (progress goes to LOG)."""
    cached = cached_manifest(cache_dir, env)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"ML env {env}: building from {base_image}", file=log, flush=True)
    context = io.BytesIO(tar_of({"Dockerfile": (FILES / BOOTSTRAP_DOCKERFILE).read_bytes()}))
    image, _ = client.images.build(
        fileobj=context, custom_context=True, buildargs={"BASE_IMAGE": base_image},
        tag=f"mlstack-bootstrap:{env}", network_mode="none", rm=True,
    )
    container = client.containers.create(image.id, network_mode="host", labels={"mlstack.env-build": env})
    try:
        programs = {f"build/{name}": (FILES / name).read_bytes() for name in BUILD_PROGRAMS}
        container.put_archive("/", tar_of({"etc/pip.conf": pip_conf(pip_options).encode(),
                                            "build/requirements.txt": requirements.encode(), **programs}))
        container.start()
        tail: list[str] = []
        for line in container.logs(stream=True, follow=True):
            text = shown_pip_line(line.decode("utf-8", "replace").rstrip(), pip_options)
            tail = (tail + [text])[-LOG_TAIL:]
            print(f"  {text}", file=log, flush=True)
        status = container.wait()["StatusCode"]
        if status != 0:
            raise ArtifactError(f"ML env {env}: pip install failed (exit {status}):\n  " + "\n  ".join(tail))
        torch_info = _read_torch_info(container, env)
        chunks, _ = container.get_archive("/root/.local")
        artifact, manifest_path = artifact_paths(cache_dir, env)
        manifest = repack_user_site(chunks, artifact, env, requirements).with_torch(torch_info)
        manifest.write(manifest_path)  # last: a manifest means the artifact is complete
    finally:
        container.remove(force=True)
    print(f"ML env {env}: {manifest.size / 1e6:.1f} MB artifact, {manifest.files} files, "
          f"built in {time.monotonic() - started:.0f}s", file=log, flush=True)
    return manifest


@dataclass(frozen=True)
class EnvSource:
    """Where the wanted env's artifact comes from: the control cache, built first if a recipe is given."""

    env: str
    cache_dir: Path
    builder: str = ""
    base: BaseImage | None = None
    requirements: str = ""  # a path on the control node
    pip_options: tuple = field(default=(), repr=False)  # (key, value) pairs, `${VAR}` references unexpanded

    def cached(self) -> Manifest | None:
        return cached_manifest(self.cache_dir, self.env)

    def artifact(self) -> Path:
        return artifact_paths(self.cache_dir, self.env)[0]

    def ensure(self) -> Manifest:
        """The artifact's manifest, built first if needed; a cached artifact is checked before it is sent."""
        return once(("artifact", self.env, self.cache_dir), self._make)

    def _make(self) -> Manifest:
        cached = self.cached()
        if cached is not None:
            check_artifact(self.artifact(), cached)
            return cached
        if self.base is None:
            raise ArtifactError(f"env {self.env} is in neither the host nor the control cache {self.cache_dir}")
        with builder_engine(self.builder, "the build failed") as client:
            require_base(client, self.builder, self.base)
            manifest = build_env(client, self.env, self.base.ref, read_requirements(self.requirements),
                                 dict(self.pip_options), self.cache_dir, log=sys.stderr)
        if manifest.python != self.base.python:
            raise ArtifactError(f"env {self.env} has site-packages for {manifest.python}, "
                                f"but {self.base.ref} runs {self.base.python}")
        return manifest


def base_image(config: HostConfig, cache_dir: Path, host_image: str | None) -> BaseImage:
    """The runtime image envs are built for and checked in. When the host runs an image an earlier probe
    recorded (an image id names its content) that record is enough, so a deploy with nothing to build
    never contacts the builder; otherwise the builder is asked, once per fleet."""
    known = known_base_image(config.ml_env_base_image, host_image, cache_dir) if host_image else None
    if known is not None:
        return known

    def probe() -> BaseImage:
        with builder_engine(config.ml_env_builder, f"cannot run {config.ml_env_base_image!r}") as client:
            return probe_base_image(client, config.ml_env_builder, config.ml_env_base_image, cache_dir)

    return once(("base", config.ml_env_builder, config.ml_env_base_image, cache_dir), probe)


def env_source(config: HostConfig, base: BaseImage) -> EnvSource:
    """The env this host should run: the pinned `ml_env_id`, or the one `ml_env_requirements` make on BASE."""
    cache_dir = Path(config.ml_env_cache_dir).expanduser()
    if config.ml_env_id:
        return EnvSource(config.ml_env_id, cache_dir, base=None)
    pip_options = config.pip_options()
    wanted = env_id(read_requirements(config.ml_env_requirements), base.id, base.platform, pip_options)
    return EnvSource(wanted, cache_dir, config.ml_env_builder, base, config.ml_env_requirements,
                     tuple((key, tuple(value) if isinstance(value, list) else value)
                           for key, value in pip_options.items()))
