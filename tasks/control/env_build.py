"""The ML env on the control side: built once per recipe on the builder, kept as an artifact in the
control cache (`ml_env_cache_dir`), checked before a byte of it is sent.

An env's id names what pip installed (tasks/control/env_artifact.py `content_id`), so it is known
only once an env was built: the cache records which env each recipe (requirements, base image,
public index settings) built, and a recipe this control node never built is built while the deploy
plans, also in a dry run (on the builder only; no host changes). Hosts are told which env to run
by `env_source`: the pinned `ml_env_id`, or the env `ml_env_requirements` built on the base image.
"""

from __future__ import annotations

import io
import ipaddress
import json
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .. import secrets
from ..config import ENV_ID, HostConfig, read_requirements
from ..paths import FILES
from .builder import BaseImage, builder_engine, known_base_image, probe_base_image, require_base, tar_of
from .caches import atomic_write, once
from .env_artifact import (
    ArtifactError,
    Manifest,
    StaleManifest,
    check_artifact,
    recipe_id,
    repack_user_site,
)

if TYPE_CHECKING:
    import docker

BOOTSTRAP_DOCKERFILE = "Dockerfile.server.bootstrap"
BUILD_PROGRAMS = ("env_build.sh", "pip_install.py", "torch_info.py")  # what the bootstrap container runs (files/)
LOG_TAIL = 20
BUILD_NETWORK = "mlstack-build"


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
    for template in index_urls(options):
        text = secrets.scrubbed(text, template)
    return text


def index_urls(options: dict) -> list[str]:
    """Every URL of the index settings, `${VAR}` references unexpanded."""
    return [url for url in (options.get("index_url"), *(options.get("extra_index_urls") or ()),
                            *(options.get("find_links") or ())) if url]


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


def _recipe_record(cache_dir: Path, recipe: str) -> Path:
    return cache_dir / "recipes" / f"{recipe}.json"


def built_from(cache_dir: Path, recipe: str) -> Manifest | None:
    """The manifest of the env RECIPE built on this control node, while its artifact is in the cache; or None."""
    try:
        env = json.loads(_recipe_record(cache_dir, recipe).read_text()).get("env")
    except (OSError, ValueError, AttributeError):
        return None
    return cached_manifest(cache_dir, env) if isinstance(env, str) and ENV_ID.fullmatch(env) else None


def _read_torch_info(container) -> dict:
    """What files/torch_info.py wrote in the finished build container: {} or torch's version, CUDA and archs."""
    chunks, _ = container.get_archive("/build/torch.json")
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
        member = archive.next()
        content = archive.extractfile(member) if member is not None and member.isfile() else None
        data = content.read() if content is not None else b""
    try:
        info = json.loads(data)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise ArtifactError(f"the build's torch report is not a JSON object: {data[:200]!r}")
    return info


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_network(client: docker.DockerClient, pip_options: dict) -> str:
    """The network the build container joins: the builder's own (host) only when an index setting names its
    loopback, which no other network reaches; else a bridge network of the build's own, made once."""
    import docker.errors  # loaded by the client's caller

    if any(_loopback(secrets.expand(url)) for url in index_urls(pip_options)):
        return "host"
    # the names filter matches parts of names: `mlstack-build-old` must not pass for it
    if not any(network.name == BUILD_NETWORK for network in client.networks.list(names=[BUILD_NETWORK])):
        try:
            client.networks.create(BUILD_NETWORK, driver="bridge", labels={"mlstack.env-build": ""},
                                   check_duplicate=True)
        except docker.errors.APIError as error:
            if error.status_code != 409:  # 409: another deploy's build made it just now
                raise
    return BUILD_NETWORK


def _remove_stopped_builds(client: docker.DockerClient) -> None:
    """Build containers a killed deploy left behind (stopped once their deploy went: they hold no
    credential); a running or just created one may be another deploy's build and is left alone."""
    for container in client.containers.list(all=True, filters={"label": "mlstack.env-build",
                                                                "status": ["exited", "dead"]}):
        container.remove(force=True)


def _run_build(container, config: bytes, pip_options: dict, log) -> None:
    """Start CONTAINER, hand it pip's config on stdin (kept open: closing it stops the build, see
    files/env_build.sh), show pip's output as it comes, and raise unless it succeeded."""
    stdin = container.client.api.attach_socket(container.id, params={"stdin": 1, "stream": 1})
    try:
        container.start()
        getattr(stdin, "_sock", stdin).sendall(config)
        tail: list[str] = []
        for line in container.logs(stream=True, follow=True):
            text = shown_pip_line(line.decode("utf-8", "replace").rstrip(), pip_options)
            tail = (tail + [text])[-LOG_TAIL:]
            print(f"  {text}", file=log, flush=True)
        status = container.wait()["StatusCode"]
    finally:
        stdin.close()
    if status != 0:
        raise ArtifactError(f"pip install failed (exit {status}):\n  " + "\n  ".join(tail))


def build_env(client: docker.DockerClient, recipe: str, base: BaseImage, requirements: str, pip_options: dict,
              cache_dir: Path, log=sys.stderr) -> Manifest:
    """The artifact RECIPE built on this control node, built first if it is not in CACHE_DIR (progress goes
    to LOG); its manifest names the env."""
    cached = built_from(cache_dir, recipe)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"ML env ({recipe}): building from {base.ref}", file=log, flush=True)
    context = io.BytesIO(tar_of({"Dockerfile": (FILES / BOOTSTRAP_DOCKERFILE).read_bytes()}))
    image, _ = client.images.build(
        fileobj=context, custom_context=True, buildargs={"BASE_IMAGE": base.ref},
        tag=f"mlstack-bootstrap:{recipe}", network_mode="none", rm=True,
    )
    _remove_stopped_builds(client)
    config = pip_conf(pip_options).encode()
    container = client.containers.create(  # stdin open and not detached: docker sets StdinOnce
        image, ["sh", "/build/env_build.sh", str(len(config))], network=build_network(client, pip_options),
        labels={"mlstack.env-build": recipe}, stdin_open=True, tmpfs={"/run/pip": "size=1m,mode=0700"})
    try:
        programs = {f"build/{name}": (FILES / name).read_bytes() for name in BUILD_PROGRAMS}
        container.put_archive("/", tar_of({"build/requirements.txt": requirements.encode(), **programs}))
        _run_build(container, config, pip_options, log)
        torch_info = _read_torch_info(container)
        manifest = repack_user_site(container.get_archive("/root/.local")[0], cache_dir, requirements,
                                    base.id, base.platform).with_torch(torch_info)
    finally:
        container.remove(force=True)
    manifest.write(artifact_paths(cache_dir, manifest.env_id)[1])  # a manifest means the artifact is complete
    atomic_write(_recipe_record(cache_dir, recipe), json.dumps({"env": manifest.env_id}))
    print(f"ML env {manifest.env_id} ({recipe}): {manifest.size / 1e6:.1f} MB artifact, {manifest.files} files, "
          f"{len(manifest.packages)} packages, built in {time.monotonic() - started:.0f}s", file=log, flush=True)
    return manifest


@dataclass(frozen=True)
class EnvSource:
    """Where the wanted env's artifact comes from: the control cache (for a recipe, built there first)."""

    env: str
    cache_dir: Path

    def cached(self) -> Manifest | None:
        return cached_manifest(self.cache_dir, self.env)

    def artifact(self) -> Path:
        return artifact_paths(self.cache_dir, self.env)[0]

    def ensure(self) -> Manifest:
        """The artifact's manifest, checked (once per deploy) before the artifact is sent."""
        return once(("artifact", self.env, self.cache_dir), self._check)

    def _check(self) -> Manifest:
        cached = self.cached()
        if cached is None:
            raise ArtifactError(f"env {self.env} is in neither the host nor the control cache {self.cache_dir}")
        check_artifact(self.artifact(), cached)
        return cached


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
    """The env this host should run: the pinned `ml_env_id`, or the one `ml_env_requirements` build on BASE
    (built now, once per fleet, if this control node never built that recipe)."""
    cache_dir = Path(config.ml_env_cache_dir).expanduser()
    if config.ml_env_id:
        return EnvSource(config.ml_env_id, cache_dir)
    pip_options = config.pip_options()
    requirements = read_requirements(config.ml_env_requirements)
    recipe = recipe_id(requirements, base.id, base.platform, pip_options)

    def build() -> Manifest:
        with builder_engine(config.ml_env_builder, "the build failed") as client:
            require_base(client, config.ml_env_builder, base)
            manifest = build_env(client, recipe, base, requirements, pip_options, cache_dir, log=sys.stderr)
        if manifest.python != base.python:
            raise ArtifactError(f"env {manifest.env_id} has site-packages for {manifest.python}, "
                                f"but {base.ref} runs {base.python}")
        return manifest

    manifest = built_from(cache_dir, recipe) or once(("build", recipe, cache_dir), build)
    return EnvSource(manifest.env_id, cache_dir)
