"""Every host the deploy targets, validated before any host changes: its settings (tasks/config.py), then its
compose project against them (tasks/control/project_checks.py, which reads the project with docker compose).
Every problem on every host is reported at once (`ConfigError`).
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

from .config import ConfigError, HostConfig, validate_settings
from .control.project_checks import project_problems


def validate_host(host_name: str, data: dict[str, Any]) -> tuple[HostConfig | None, list[str]]:
    """HOST_NAME's config and every problem of its settings and of its compose project against them (the
    project is read only once the settings are valid)."""
    config, problems = validate_settings(host_name, data)
    if config is None:
        return None, problems
    return config, problems + project_problems(host_name, config)


def validate_fleet(hosts: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, HostConfig]:
    configs: dict[str, HostConfig] = {}
    problems: list[str] = []
    for host_name, data in hosts:
        config, host_problems = validate_host(host_name, data)
        problems += host_problems
        if config is not None:  # None comes with problems: raised below
            configs[host_name] = config
    if problems:
        raise ConfigError(problems)
    return configs


_fleet_configs: dict[str, HostConfig] | None = None
_validating = threading.Lock()  # gevent's under pyinfra, whose CLI patches threading before it imports us


def host_config(host) -> HostConfig:
    """This host's config; the first call validates every host the deploy targets. pyinfra runs the deploy for
    every host at once, each in a greenlet: the others wait for that first validation (reading the compose
    project runs docker compose, and a greenlet waiting on it lets the next one in) rather than each validating
    the fleet again."""
    global _fleet_configs
    with _validating:
        if _fleet_configs is None:
            from pyinfra import inventory  # only inside a pyinfra run

            _fleet_configs = validate_fleet((h.name, h.data.dict()) for h in inventory.get_active_hosts())
    return _fleet_configs[host.name]
