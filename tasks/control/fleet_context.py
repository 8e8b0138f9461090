"""What the control side knows for the whole fleet, made once per deploy before any host is planned
(tasks/deploy.py) and handed down to the host side: the compose project and its config
as compose resolves it, the runtime base image, the env a host runs (built first where this control node
never built its recipe) and its manifest. The host modules (tasks/host/*) plan against what they are handed
and do not import the control modules that make these (tests/unit/test_code_structure.py).

Settings may differ from host to host, so each value is made for the settings it depends on, lazily (only
when a host's plan asks: a no-op computes nothing it does not need), and once per deploy, however many hosts
ask: the control node's files (a requirements file, a manifest, a base image record) are read once, not once
per host.
"""

from __future__ import annotations

from pathlib import Path

from ..config import HostConfig
from .builder import BaseImage
from .caches import Once
from .compose_project import ComposeProject, project_of, resolved_config
from .env_artifact import Manifest
from .env_build import EnvSource, base_image, env_source


class FleetContext:
    def __init__(self):
        self.made = Once()  # this deploy's values, by what they depend on; a failure too, for every host

    def project(self, config: HostConfig) -> ComposeProject:
        """The compose project CONFIG names, read by compose (variables not interpolated)."""
        return project_of(config)

    def resolved(self, project: ComposeProject, values: tuple[tuple[str, str], ...]) -> dict:
        """PROJECT's config as compose resolves it with VALUES (the host's .env)."""
        return resolved_config(project, values)

    def base_image(self, config: HostConfig, host_image: str | None) -> BaseImage:
        """The runtime image envs are built for, known from the record of HOST_IMAGE (the host's copy) where an
        earlier deploy made one, else from the builder."""
        cache_dir = Path(config.ml_env_cache_dir).expanduser()
        return self.made(("base", config.ml_env_builder, config.ml_env_base_image, cache_dir, host_image),
                         lambda: base_image(config, cache_dir, host_image))

    def env(self, config: HostConfig, base: BaseImage) -> EnvSource:
        """The env a host of CONFIG runs on BASE: the pinned `ml_env_id`, or its requirements' build."""
        key = ("env", config.ml_env_id, config.ml_env_requirements, repr(config.pip_options()),
               config.ml_env_cache_dir, config.ml_env_builder, base)
        return self.made(key, lambda: env_source(config, base))

    def stored_env(self, env: str, cache_dir: Path) -> EnvSource:
        """ENV as the control cache CACHE_DIR holds it: an env of a host's store, not the one it is given."""
        return EnvSource(env, cache_dir)

    def manifest(self, source: EnvSource) -> Manifest | None:
        """SOURCE's manifest in the control cache, or None where this control node does not hold the env."""
        return self.made(("manifest", source), source.cached)

