"""What the deploy decides from, read from the host in one round trip (one `HostProbe` fact).

Every concern plans from its own part of it; only the deploy lock (before it) and the import check
of the active env (ml_env_check_active) cost a round trip of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyinfra import host

from tasks.config import HostConfig
from tasks.directories import watched_paths
from tasks.facts import HostProbe, MlEnvHostState, MlEnvState, ModelCacheHostState, ModelCacheState, PathState, \
    PathStates, StackHostState, StackState
from tasks.gpu import Gpu, NvidiaGpus
from tasks.stack import StackDef


@dataclass(frozen=True)
class HostState:
    paths: dict[str, PathState]  # the configured directories and their ancestors
    ml_env: MlEnvHostState
    models: ModelCacheHostState
    gpus: list[Gpu]
    stack: StackHostState


def read_host_state(config: HostConfig) -> HostState:
    definition = StackDef.load(config.stack)
    parts = (
        ("paths", PathStates, {"paths": watched_paths(config.directories())}),
        ("ml_env", MlEnvState, {"env_dir": config.ml_env_dir, "image": config.ml_env_base_image}),
        ("models", ModelCacheState, {"cache_dir": config.model_cache_dir, "hashes": config.model_verify_hashes,
                                     "folders": tuple(spec.folder for spec in config.models)}),
        ("gpus", NvidiaGpus, {}),
        ("stack", StackState, {"compose_dir": config.compose_project_dir, "project": definition.project,
                               "repository": definition.repository}),
    )
    return HostState(**host.get_fact(HostProbe, parts=parts))
