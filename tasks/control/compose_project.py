"""The user's compose project on the control side, read by compose itself: its files, its `.env` entries as
written, its services and the variables they read, its `build:` services.

The project is a directory (`stack`: a name under files/stacks/ or an absolute path) holding compose files
under compose's own names, or the ones `compose_files` lists, and the build contexts they name. Its files
reach the hosts byte for byte; what the deploy adds lives in `compose.mlstack.yml` (tasks/host/stack_render.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pyinfra.api.exceptions import PyinfraError

from ..paths import STACKS
from .caches import once

COMPOSE_NAMES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")  # compose's order
OVERRIDE_NAMES = ("compose.override.yaml", "compose.override.yml", "docker-compose.override.yml",
                  "docker-compose.override.yaml")  # compose's order, whichever the main file's name
OVERRIDE = "compose.mlstack.yml"  # the deploy's own compose file, merged last
BASE_IMAGE_VARIABLE = "MLSTACK_BASE_IMAGE"  # the runtime image the env is built for, for `build.args`
# `${NAME}`, `${NAME:-default}`, `${NAME?error}`, ..., or `$NAME`; `$$` is a literal dollar.
VARIABLE = re.compile(r"\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<modifier>:?[-?+])?"
                      r"|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)")
SHIPPABLE = re.compile(r"[^\s\\\x00-\x1f\x7f](?:[^\\\x00-\x1f\x7f]*[^\s\\\x00-\x1f\x7f])?")  # one path per line
SKIPPED = {".git", "__pycache__", ".mypy_cache", ".pytest_cache", ".venv", "node_modules"}
DOTENV = ".env"  # the project's own: the base of the host's .env, which the deploy writes (not sent as a file)
# The start of a `.env` entry as compose reads one: `KEY=value`, `export KEY=value` or `KEY: value`.
DOTENV_ENTRY = re.compile(r"[ \t]*(?:export[ \t]+)?(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)[ \t]*[=:][ \t]*(?P<value>.*)")
# Where the docker CLI looks for its plugins after the user's ~/.docker/cli-plugins (docker/cli, Linux).
PLUGIN_DIRS = ("/usr/local/lib/docker/cli-plugins", "/usr/local/libexec/docker/cli-plugins",
               "/usr/lib/docker/cli-plugins", "/usr/libexec/docker/cli-plugins")


class StackError(PyinfraError):
    """The stack cannot be planned or built; the message names the stack, the setting and what to do."""


def project_directory(stack: str) -> Path:
    return Path(stack) if stack.startswith("/") else STACKS / stack


@dataclass(frozen=True)
class Build:
    """One `build:` service: what the builder needs, paths absolute on the control node."""

    service: str
    context: Path
    dockerfile: str
    args: dict = field(hash=False)
    target: str | None
    network: str | None  # compose's `build.network`; None: the builder's default
    spec: str = ""  # the service's whole `build:` section as compose resolved it, as JSON (what names its image)


@dataclass(frozen=True)
class ComposeProject:
    directory: Path
    files: tuple[str, ...]  # the project's compose files, relative to its directory, in merge order
    name: str  # compose's project name
    services: dict = field(hash=False)  # service -> its merged definition, variables not interpolated
    secrets: dict = field(hash=False, default_factory=dict)  # compose's top-level `secrets:`
    dotenv: dict = field(hash=False, default_factory=dict)  # the project's `.env`: key -> its entry as written
    volumes: dict = field(hash=False, default_factory=dict)  # compose's top-level `volumes:`
    networks: dict = field(hash=False, default_factory=dict)  # compose's top-level `networks:`

    @classmethod
    @cache  # read once per deploy, however many hosts
    def load(cls, stack: str, compose_files: tuple[str, ...] = ()) -> ComposeProject:
        directory = project_directory(stack)
        files = compose_files or default_compose_files(directory)
        dotenv = dotenv_entries(directory / DOTENV)
        model = compose_config(directory, files)
        return cls(directory, files, model["name"], model.get("services") or {}, model.get("secrets") or {}, dotenv,
                   volumes=model.get("volumes") or {}, networks=model.get("networks") or {})

    def reads(self, service: str) -> dict[str, bool]:
        """Variable -> whether it has a default, for every variable SERVICE's definition interpolates, and
        the variable of each `environment:` secret it uses (compose copies its value into the container)."""
        found: dict[str, bool] = {}
        for text in strings(self.services[service]):
            for match in VARIABLE.finditer(text.replace("$$", "")):
                name = match["braced"] or match["plain"]
                has_default = (match["modifier"] or "").lstrip(":") in ("-", "+")
                found[name] = found.get(name, False) or has_default
        for used in self.services[service].get("secrets") or []:
            source = used["source"] if isinstance(used, dict) else used
            variable = (self.secrets.get(source) or {}).get("environment")
            if variable:
                found.setdefault(variable, False)
        return found

    def active(self, profiles: list[str]) -> list[str]:
        """The services that run with PROFILES: those without a profile, and those in one of them."""
        return [name for name, spec in self.services.items()
                if not spec.get("profiles") or set(spec["profiles"]) & set(profiles)]

    def builds(self, resolved: dict) -> list[Build]:
        """The `build:` services, their args as compose interpolated them (RESOLVED: `resolved_config`)."""
        builds = []
        for name, spec in resolved.get("services", {}).items():
            if "build" in spec:
                build = spec["build"]
                builds.append(Build(name, Path(build["context"]), build.get("dockerfile", "Dockerfile"),
                                    build.get("args") or {}, build.get("target"), build.get("network"),
                                    json.dumps(build, sort_keys=True)))
        return builds

    def files_to_ship(self) -> dict[str, bytes]:
        """Every file of the project directory, by relative path: the hosts get the project as it is
        (symbolic links, tool caches such as .git or __pycache__, and the `.env` the deploy writes from the
        project's excepted). Read once per deploy."""
        return _project_files(self.directory)

    def file_hashes(self) -> dict[str, str]:
        """sha256 of each of `files_to_ship`, computed once per deploy."""
        return _project_hashes(self.directory)

    def file_modes(self) -> dict[str, int]:
        """The mode each of `files_to_ship` gets on hosts (`shipped_mode`), read once per deploy."""
        return _project_modes(self.directory)


def dotenv_entries(path: Path) -> dict[str, str]:
    """Key -> its entry as written (a quoted value may span lines), for each entry of the project's `.env`, in
    order; a later entry of a key replaces an earlier one, as in compose. Values are kept as written, never
    parsed: on the host, compose reads them exactly as it does here. Comments and blank lines are left out."""
    if not path.is_file() or path.is_symlink():
        return {}
    entries: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise StackError(f"{path}: expected UTF-8 text, as compose reads a .env file") from None
    number = 0
    while number < len(lines):
        line = lines[number]
        number += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry = DOTENV_ENTRY.fullmatch(line)
        if entry is None:  # the line itself is never shown: it may hold a secret
            raise StackError(f"{path}, line {number}: expected KEY=value, as compose reads a .env file")
        text, quote = [line], entry["value"][:1]
        while quote in ("'", '"') and not _closes(entry["value"][1:] if len(text) == 1 else text[-1], quote):
            if number == len(lines):
                raise StackError(f"{path}: the value of {entry['key']} opens a {quote} quote that never closes")
            text.append(lines[number])
            number += 1
        entries.pop(entry["key"], None)
        entries[entry["key"]] = "\n".join(text)
    return entries


def _closes(text: str, quote: str) -> bool:
    """Whether TEXT holds the closing QUOTE (in double quotes, `\\"` is an escaped quote, not the end)."""
    if quote == "'":
        return "'" in text
    return re.search(r'(?<!\\)(?:\\\\)*"', text) is not None


@cache
def _project_paths(directory: Path) -> dict[str, Path]:
    """Each file of the project directory that is shipped, by its relative name."""
    found = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if SKIPPED & set(relative.parts) or not path.is_file() or path.is_symlink() or relative.as_posix() == DOTENV:
            continue
        name = relative.as_posix()
        if not SHIPPABLE.fullmatch(name):
            raise StackError(f"stack {str(directory)!r}: the file name {name!r} cannot be shipped (control "
                             "characters, a backslash, or spaces at either end): rename it")
        found[name] = path
    return found


@cache
def _project_files(directory: Path) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in _project_paths(directory).items()}


@cache
def _project_hashes(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in _project_files(directory).items()}


def shipped_mode(mode: int) -> int:
    """The mode a project file whose mode is MODE gets on hosts: the owner (root) reads and writes; group and
    others read only where the source lets them, and never write; execute where the source's owner may,
    for whoever may read (0644 at most, 0755 for a program, 0600 stays 0600)."""
    readable = 0o600 | (mode & 0o044)
    return readable | (readable & 0o444) >> 2 if mode & 0o100 else readable


@cache
def _project_modes(directory: Path) -> dict[str, int]:
    return {name: shipped_mode(path.stat().st_mode) for name, path in _project_paths(directory).items()}


def project_of(config) -> ComposeProject:
    """The compose project a HostConfig names."""
    return ComposeProject.load(config.stack, tuple(config.compose_files))


def default_compose_files(directory: Path) -> tuple[str, ...]:
    """What `docker compose` reads there without -f: the first of its names, then the first override file
    found (compose 2.26 takes `compose.override.yaml` even beside `docker-compose.yml`)."""
    for name in COMPOSE_NAMES:
        if (directory / name).is_file():
            overrides = [override for override in OVERRIDE_NAMES if (directory / override).is_file()]
            return (name, *overrides[:1])
    raise StackError(f"stack {str(directory)!r}: none of {', '.join(COMPOSE_NAMES)} is there: "
                     "point `stack` at a compose project directory, or list its files in compose_files")


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in strings(key) + strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in strings(item)]
    return []


def compose_config(directory: Path, files: tuple[str, ...], values: dict[str, str] | None = None) -> dict:
    """The merged project as `docker compose config` prints it; variables interpolated from VALUES only
    (none of this process's environment), or not at all when VALUES is None."""
    if shutil.which("docker") is None:
        raise StackError("the control node needs the docker CLI with its compose plugin to read the stack "
                         "(`docker compose version` must work)")
    argv = [*compose_command(), "--project-directory", str(directory),
            *[arg for name in files for arg in ("-f", str(directory / name))], "config", "--format", "json"]
    if values is None:
        argv.append("--no-interpolate")
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(values or {})}
    result = subprocess.run(argv, capture_output=True, text=True, env=environment, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise StackError(f"stack {str(directory)!r}: docker compose cannot read {', '.join(files)}: "
                         f"{result.stderr.strip()[-1500:]}")
    return json.loads(result.stdout)


@cache
def compose_command() -> tuple[str, ...]:
    """How `compose_config` runs compose: the plugin binary the docker CLI would run, itself (the CLI's start and
    its plugin metadata call are two more Go programs, ~0.08 s of CPU a read); `docker compose` where the CLI's
    config adds plugin folders. The CLI is started with no HOME: its config is the passwd home's ~/.docker."""
    config_dir = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".docker"
    try:
        extra_dirs = "cliPluginsExtraDirs" in (config_dir / "config.json").read_text(errors="replace")
    except OSError:
        extra_dirs = False
    for folder in () if extra_dirs else (config_dir / "cli-plugins", *map(Path, PLUGIN_DIRS)):
        plugin = folder / "docker-compose"
        if plugin.is_file() and os.access(plugin, os.X_OK):
            return (str(plugin),)
    return ("docker", "compose")


def resolved_config(project: ComposeProject, values: tuple[tuple[str, str], ...]) -> dict:
    """The project as compose interpolates it from VALUES: one `docker compose config` per deploy and VALUES, however
    many hosts ask at once (`once`: a greenlet waiting on compose lets the next host's in, which a plain cache
    would let run compose again)."""
    return once(("resolved", project, values), lambda: compose_config(project.directory, project.files, dict(values)))
