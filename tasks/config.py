"""Host data -> a typed, validated config per host, before any host is changed.

Defaults live in `inventory/group_data/all.py`; this module only says what a valid value is.
Every problem on every host is reported at once, each naming the host, the setting, the value
and what is expected. Keys that are neither ours nor pyinfra's (connector data, global
arguments) are typos and fail too, with the closest known key as a suggestion.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, Iterable

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pyinfra.api.arguments import all_global_arguments
from pyinfra.api.connectors import get_all_connectors
from pyinfra.api.exceptions import PyinfraError

MAX_ID = 4294967294  # 2**32 - 2: (uid_t)-1 means "unchanged" to chown(2)


class ConfigError(PyinfraError):
    """Invalid inventory data; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid inventory data, nothing was changed:\n  " + "\n  ".join(problems))


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("expected an absolute path such as '/srv/mlstack'")
    if "\n" in value or "\0" in value:
        raise ValueError("expected a path without newline or NUL characters")
    normal = os.path.normpath(value).replace("//", "/")
    if normal != value:
        raise ValueError(f"expected a normalised path (did you mean {normal!r}?)")
    if value == "/":
        raise ValueError("expected a directory below '/', not '/' itself")
    return value


def _id(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise ValueError(f"expected an integer id from 0 to {MAX_ID}")
    return value


def _mode(value: Any) -> int:
    """'0755', '755' or pyinfra-style 755 (octal digits); 0o755 would be the int 493 and is refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not re.fullmatch(r"0?[0-7]{3,4}", str(value)):
        raise ValueError("expected an octal mode such as '0755'")
    return int(str(value), 8)


AbsolutePath = Annotated[str, BeforeValidator(_path)]
NumericId = Annotated[int, BeforeValidator(_id)]
OctalMode = Annotated[int, BeforeValidator(_mode)]


@dataclass(frozen=True)
class DirectorySpec:
    setting: str
    path: str
    uid: int
    gid: int
    mode: int


class HostConfig(BaseModel):
    """Every setting of the deploy; the README table documents each with its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stack_root: AbsolutePath
    stack_root_uid: NumericId
    stack_root_gid: NumericId
    stack_root_mode: OctalMode
    ml_env_dir: AbsolutePath
    ml_env_dir_uid: NumericId
    ml_env_dir_gid: NumericId
    ml_env_dir_mode: OctalMode
    model_cache_dir: AbsolutePath
    model_cache_dir_uid: NumericId
    model_cache_dir_gid: NumericId
    model_cache_dir_mode: OctalMode
    compose_project_dir: AbsolutePath
    compose_project_dir_uid: NumericId
    compose_project_dir_gid: NumericId
    compose_project_dir_mode: OctalMode

    def directories(self) -> list[DirectorySpec]:
        return [
            DirectorySpec(
                setting=name,
                path=getattr(self, name),
                uid=getattr(self, f"{name}_uid"),
                gid=getattr(self, f"{name}_gid"),
                mode=getattr(self, f"{name}_mode"),
            )
            for name in ("stack_root", "ml_env_dir", "model_cache_dir", "compose_project_dir")
        ]


def pyinfra_keys() -> set[str]:
    """Data keys that belong to pyinfra (connector data, `_sudo`-style global arguments), not to us."""
    connector_keys = {key for connector in get_all_connectors().values() for key in getattr(connector, "data_meta", {})}
    return connector_keys | {name for name, _ in all_global_arguments() if name.startswith("_")}


_MISSING = object()


def _problem(host_name: str, key: str, value: Any, expected: str) -> str:
    shown = "(not set)" if value is _MISSING else repr(value)
    return f"{host_name}: {key} = {shown}: {expected}"


def validate_host(host_name: str, data: dict[str, Any]) -> tuple[HostConfig | None, list[str]]:
    theirs = pyinfra_keys()
    ours = {key: value for key, value in data.items() if key not in theirs}
    try:
        config = HostConfig(**ours)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = str(item["loc"][0])
            if item["type"] == "extra_forbidden":
                guess = difflib.get_close_matches(key, [*HostConfig.model_fields, *sorted(theirs)], n=1)
                hint = f" (did you mean {guess[0]!r}?)" if guess else ""
                problems.append(_problem(host_name, key, ours[key], f"unknown setting{hint}"))
            elif item["type"] == "missing":
                problems.append(_problem(host_name, key, _MISSING, "a value is required (defaults: inventory/group_data/all.py)"))
            else:
                expected = item["msg"].removeprefix("Value error, ")
                problems.append(_problem(host_name, key, ours.get(key, _MISSING), expected))
        return None, problems
    return config, _cross_checks(host_name, config)


def _cross_checks(host_name: str, config: HostConfig) -> list[str]:
    problems = []
    seen: dict[str, str] = {}
    for spec in config.directories():
        if spec.path in seen:
            problems.append(_problem(host_name, spec.setting, spec.path, f"a path of its own (it is also {seen[spec.path]})"))
        seen[spec.path] = spec.setting
    return problems


def validate_fleet(hosts: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, HostConfig]:
    configs, problems = {}, []
    for host_name, data in hosts:
        config, host_problems = validate_host(host_name, data)
        problems += host_problems
        configs[host_name] = config
    if problems:
        raise ConfigError(problems)
    return configs


_fleet_configs: dict[str, HostConfig] | None = None


def host_config(host) -> HostConfig:
    """This host's config; the first call validates every host the deploy targets."""
    global _fleet_configs
    if _fleet_configs is None:
        from pyinfra import inventory  # noqa: PLC0415 (only inside a pyinfra run)

        _fleet_configs = validate_fleet((h.name, h.data.dict()) for h in inventory.get_active_hosts())
    return _fleet_configs[host.name]
