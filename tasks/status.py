"""The read-only day-two views of a fleet, as pyinfra packaged functions: `mlstack_status()` reads what each host
runs, `mlstack_logs()` one service's logs. Neither adds an operation, takes the deploy lock, builds, downloads or
sends anything; each reads a host in one round trip. `mlstack status|logs` (tasks/fleet/day_two.py) run them
with `--dry` and read what they found from the report's `status` field (report.py).

A host's status is a dict, the same in the report and in `mlstack status --json`:

    {"drift": "ok", "problems": [], "errors": [],
     "release": {"id": "rel-…", "activated": "…Z", "created": "…Z", "control_node": "ci@control"},
     "releases": ["rel-…", "rel-…"], "env": "env-…", "envs": ["env-…"],
     "models": [{"repo_id": "org/name", "revision": "main", "commit": "e4ce…", "present": true}],
     "services": {"reranker": {"state": "running", "health": "healthy"}},
     "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", …}], "docker_gpus": "runtime",
     "lock": {"held": false, "holder": ""}}

`drift` is one word (DRIFT in tasks/fleet/day_two.py); `problems` says why it is not `ok`; `errors` names the
parts of the host that could not be read (their keys then hold what is known: null or empty).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace

from pyinfra import host, state
from pyinfra.api import FactBase, deploy

from .config import DEFAULTS, HostConfig, SettingsError, pyinfra_keys
from .fleet.day_two import LOGS_OPTIONS, LogOptions, printable
from .host import deadline, gpus, models, releases
from .host.gpus import GpuState
from .host.lock import LOCK_DIR
from .host.models import ModelCacheState
from .host.probe import PartFailure, ProbePart, carried, probe_values, received
from .host.programs import program
from .host.releases import ReleasesState
from .report import report
from .validation import host_config

# -- what the host says, besides the models, GPUs and releases --------------------------------------------------

ENV_ID = re.compile(r"env-[0-9a-f]{16}")
SHA256 = re.compile(r"[0-9a-f]{64}")
PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # compose's rule for a project name


@dataclass(frozen=True)
class Container:
    state: str  # docker's: running, exited, created, ...
    health: str = ""  # "healthy", "unhealthy", "starting", or "" without a healthcheck


@dataclass(frozen=True)
class HostState:
    """What files/host/status_probe.sh read."""

    lock: str = "unknown"  # "free", "held", "unknown"
    holder: str = ""  # the holder line the deploy wrote, when held; why, when unknown
    files: str | None = None  # sha256 of .mlstack-files and .env.digest: a release's `files`; None without them
    changed: tuple[str, ...] = ()  # files of .mlstack-files whose content differs ("path (missing)" when gone)
    dotenv: str = "unknown"  # .env against the current release's copy: "same", "differs", "no-release", "unknown"
    env: str | None = None  # the env `active` points at
    envs: tuple[str, ...] = ()  # the envs in envs/
    containers: dict = field(default_factory=dict, hash=False)  # (project, service) -> Container
    docker: bool = True  # docker listed the containers
    project: str = ""  # the compose project the compose directory's .env names (COMPOSE_PROJECT_NAME)


class StatusFact(FactBase):
    """The deploy lock (held or free, and who holds it, without taking it), the compose directory against the
    current release, the active env and every compose container (files/host/status_probe.sh)."""

    def command(self, lock_dir: str, compose_dir: str, releases_dir: str, env_dir: str) -> str:
        return program("status_probe.sh", lock_dir, compose_dir, releases_dir, env_dir)

    def process(self, output: list[str]) -> HostState:
        found: dict = {"changed": [], "envs": [], "containers": {}}
        for line in output:
            kind, _, rest = line.partition(" ")
            if kind == "lock":
                found.update(_lock(rest))
            elif kind == "files" and SHA256.fullmatch(rest):
                found["files"] = rest
            elif kind == "file":
                path, _, verdict = rest.rpartition(": FAILED")
                found["changed"].append(printable(path) + (" (missing)" if "open or read" in verdict else ""))
            elif kind == "dotenv" and rest in ("same", "differs", "no-release", "unknown"):
                found["dotenv"] = rest
            elif kind == "env-active" and ENV_ID.fullmatch(rest.removeprefix("envs/")):
                found["env"] = rest.removeprefix("envs/")
            elif kind == "env" and ENV_ID.fullmatch(rest):
                found["envs"].append(rest)
            elif kind == "container" and rest.count("|") == 4:
                found["containers"].update(_container(rest))
            elif kind == "docker-failed":
                found["docker"] = False
            elif kind == "project" and PROJECT_NAME.fullmatch(rest):
                found["project"] = rest
        return HostState(**{**found, "changed": tuple(found["changed"]), "envs": tuple(sorted(found["envs"]))})


def _lock(rest: str) -> dict:
    """A `lock` line: the lock's state and its holder line (or why it is unknown); nothing if malformed."""
    state, _, text = rest.partition(" ")
    state = state.rstrip(":")
    return {"lock": state, "holder": printable(text)} if state in ("free", "held", "unknown") else {}


def _container(rest: str) -> dict:
    """A `container` line (project|service|state|status|oneoff): {(project, service): Container}, or nothing for
    `docker compose run`'s containers, which are not the service's."""
    project, service, state, status, oneoff = rest.split("|")
    if oneoff == "True":
        return {}
    # "Up 2 minutes (healthy)", "(unhealthy)", "(health: starting)"; nothing without a healthcheck
    health = next((word for word in ("unhealthy", "healthy", "starting") if word in status), "")
    return {(project, service): Container(state, health)}


def status_parts(config: HostConfig) -> tuple[ProbePart, ...]:
    """The model cache (unhashed: `mlstack verify --hashes` hashes), the GPUs and the releases as the deploy reads
    them, and this module's part in place of the deploy's env and stack parts (which ask docker five times where
    status needs one `docker ps`: on a fleet sharing the control node's cores, each docker CLI start counts)."""
    model_part = models.probe_part(config)
    return (replace(model_part, arguments={**model_part.arguments, "hashes": False}), gpus.probe_part(),
            releases.probe_part(config),
            ProbePart("host", StatusFact, {"lock_dir": LOCK_DIR, "compose_dir": config.compose_project_dir,
                                           "releases_dir": releases.releases_dir(config),
                                           "env_dir": config.ml_env_dir}))


# -- a host's status, from what was read (pure) -----------------------------------------------------------------


@dataclass
class Read:
    """What one probe read; a part that failed is None, and named in ERRORS."""

    models: ModelCacheState | None = None
    gpus: GpuState | None = None
    releases: ReleasesState | None = None
    host: HostState | None = None
    errors: list[str] = field(default_factory=list)


def current_release(read: Read):
    state = read.releases
    return state.releases.get(state.current) if state and state.current else None


def service_states(read: Read) -> dict[str, dict]:
    """Each service of the current release (those it recorded an image id for) and each container of its
    project, with its state and health ("missing": a service without a container). Without a release: the
    containers of the project the compose directory's .env names (a deploy from before releases were kept)."""
    current = current_release(read)
    project = current.project if current else read.host.project if read.host else ""
    containers = {service: container for (name, service), container in
                  (read.host.containers.items() if read.host else ()) if name == project}
    expected = set(current.image_ids) if current else set()
    return {name: ({"state": containers[name].state, "health": containers[name].health} if name in containers
                   else {"state": "missing", "health": ""})
            for name in sorted(expected | set(containers))}


def drift(read: Read) -> tuple[str, list[str]]:
    """The host's drift word (DRIFT in tasks/fleet/day_two.py) and the problems behind it, every one of them."""
    if read.releases is None:
        return "unknown", []
    release = current_release(read)
    if release is None:
        return "none", ["no release recorded"]
    if read.host is None or not read.host.docker:
        return "unknown", []
    degraded = [f"{name} {service['state']}" + (f" ({service['health']})" if service["health"] else "")
                for name, service in service_states(read).items()
                if service["state"] != "running" or service["health"] not in ("", "healthy")]
    modified = []
    if read.host.files != release.files:
        modified.append(f"the compose project's files or .env values are not {release.id}'s")
    modified += [f"{path} edited since the deploy" for path in read.host.changed]
    if read.host.dotenv == "differs":
        modified.append(f".env differs from {release.id}'s")
    word = "degraded" if degraded else "modified" if modified else "ok"
    return word, [*degraded, *modified]


def model_states(config: HostConfig, state: ModelCacheState | None) -> list[dict]:
    """Each configured model: the commit its revision names on the host (refs/, or the revision itself when it is
    a commit) and whether that snapshot is there."""
    found = []
    for spec in config.models:
        repo = state.repos.get(spec.folder) if state else None
        if repo is None:
            commit = None
        elif spec.revision in repo.snapshots:
            commit = spec.revision
        else:
            commit = repo.refs.get(spec.revision)
        found.append({"repo_id": spec.repo_id, "revision": spec.revision, "commit": commit,
                      "present": bool(repo and commit in repo.snapshots)})
    return found


def host_status(config: HostConfig, read: Read) -> dict:
    """The status of one host (the module's docstring shows its shape)."""
    word, problems = drift(read)
    release = current_release(read)
    return {
        "drift": word, "problems": problems, "errors": list(read.errors),
        "release": None if release is None else {key: getattr(release, key) for key in
                                                 ("id", "activated", "created", "control_node")},
        "releases": list(read.releases.releases) if read.releases else [],
        "env": read.host.env if read.host else None,
        "envs": list(read.host.envs) if read.host else [],
        "models": model_states(config, read.models) if read.models else [],
        "services": service_states(read),
        "gpus": [asdict(gpu) for gpu in read.gpus.gpus] if read.gpus else [],
        "docker_gpus": read.gpus.docker_gpus if read.gpus else "",
        "lock": lock_state(read.host),
    }


def lock_state(state: HostState | None) -> dict:
    """The deploy lock: held true or false, and the holder line the deploy wrote; held null when unknown (then
    the holder says why, if the host said)."""
    if state is None or state.lock == "unknown":
        return {"held": None, "holder": state.holder if state else ""}
    return {"held": state.lock == "held", "holder": state.holder}


# -- the packaged functions -------------------------------------------------------------------------------------


def settings(host) -> HostConfig:
    """This host's settings, as the deploy reads them, without the checks of the compose project against them
    (those need docker compose on the control node, and status reports what the hosts run whatever the project
    says now: verify and deploy check it); settings that do not validate stop the run as in a deploy."""
    try:
        return HostConfig(**{key: value for key, value in host.data.dict().items() if key not in pyinfra_keys()})
    except SettingsError:
        return host_config(host)  # raises the fleet's problems, each named


@deploy("mlstack status", data_defaults=DEFAULTS)
def mlstack_status() -> None:
    """Read each host's status into the report; no operation, no lock."""
    report.start()
    config = settings(host)
    deadline.apply(state, host, config.host_command_timeout, config.host_transfer_timeout)  # each read has one
    parts = status_parts(config)
    values = probe_values(*parts)  # one round trip; a failed part costs only its own view
    read = Read(errors=[f"{part.name}: {values[part.name].message}" for part in parts
                        if isinstance(values[part.name], PartFailure)])
    for part in parts:
        if not isinstance(values[part.name], PartFailure):
            setattr(read, part.name, values[part.name])
    if read.host is not None and not read.host.docker:
        read.errors.append("docker: cannot list the containers")
    record = report[host.name]
    record.status = host_status(config, read)
    if read.errors:
        record.fail("step", "could not read " + "; ".join(read.errors), "Status")
    record.planned = True


ERASE_LINE = "\x1b[2K"  # compose starts each log line with it, even with --no-color and without a terminal


class ServiceLogsFact(FactBase):
    """One service's logs (files/host/service_logs.sh): compose's exit status, and the lines it printed."""

    def command(self, compose_dir: str, service: str, since: str, tail: str, timestamps: bool) -> str:
        return carried(program("service_logs.sh", compose_dir, service, "yes" if timestamps else "no", since, tail))

    def process(self, output: list[str]) -> tuple[int, list[str]]:
        marker = "@@mlstack-logs-status "
        try:  # a log line with a byte that is not UTF-8 comes as \xNN, and every line after it still comes
            lines = [line.removeprefix(ERASE_LINE) for line in received(output)]
        except ValueError as error:
            return 255, [str(error)]
        if not lines or not lines[-1].startswith(marker) or not lines[-1][len(marker):].isdigit():
            return 255, lines  # cut short: whatever came is shown
        return int(lines[-1][len(marker):]), lines[:-1]


@deploy("mlstack logs", data_defaults=DEFAULTS)
def mlstack_logs() -> None:
    """Read one service's logs on each host into the report (options: MLSTACK_LOGS, JSON of LogOptions)."""
    report.start()
    options = LogOptions(**json.loads(os.environ.get(LOGS_OPTIONS, "{}")))
    if options.problems():
        raise ValueError(f"mlstack logs: {'; '.join(options.problems())}")
    config = settings(host)
    deadline.apply(state, host, config.host_command_timeout, config.host_transfer_timeout)
    read = host.get_fact(ServiceLogsFact, compose_dir=config.compose_project_dir, service=options.service,
                         since=options.since, tail=options.tail, timestamps=options.timestamps)
    status, lines = read if read is not None else (255, [])
    record = report[host.name]
    record.status = {"logs": lines, "exit": status}
    if status != 0:
        said = " / ".join(line.strip() for line in lines[-3:] if line.strip())
        record.fail("step", f"docker compose logs exited with status {status}" + (f": {said}" if said else ""),
                    "Logs")
    record.planned = True
