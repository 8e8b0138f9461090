"""The user's compose project on a host: its files pushed byte for byte, the deploy's additions in one
generated file (`compose.mlstack.yml`), its built images shipped, validated on the host, then brought up —
recreating exactly the services whose config changed — behind a health gate.

The override is a dict dumped with PyYAML; values the deploy injects (paths, model ids, commits) have `$`
doubled so compose never interpolates them. `.env` (0600) holds COMPOSE_FILE, COMPOSE_PROJECT_NAME and
COMPOSE_PROFILES, so `docker compose` run by hand in the project directory acts on the same project, then the
values compose interpolates (`stack_env`, secrets), then the project's own `.env` entries the deploy does not
set: a value reaches only the services whose definitions read it.
`.env.digest` (key → scrypt fingerprint of the value, with the host's salt) lets later runs see what
changed without reading a secret back, and the `mlstack.config` label hashes fingerprints, not values;
`.mlstack-files` (sha256 and path per line) records what the last push placed.
"""
from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
import re
import shlex
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import yaml
from pyinfra import host
from pyinfra import state as pyinfra_state
from pyinfra.api import FactBase, FunctionCommand, StringCommand, operation

from ..config import HostConfig
from ..control.builder import BaseImage, BuilderError
from ..control.caches import atomic_write, file_sha256, once
from ..control.compose_project import (
    BASE_IMAGE_VARIABLE,
    OVERRIDE,
    ComposeProject,
    StackError,
    project_of,
    resolved_config,
)
from ..control.env_build import base_image
from ..control.hub import Snapshot
from ..control.image_archives import archive_layers, chain_ids, partial_archive
from ..control.registry import (
    RegistryImage,
    docker_config,
    inspect_on_builder,
    pull_and_save,
    registry_images,
    registry_of,
)
from ..control.stack_project import build_and_save, image_tag
from ..report import ServiceOutcome, StackOutcome, report
from ..secrets import SALT, fingerprint
from .declarations import declaration_problems, declares_externals, read_name
from .failure import HostProblem, failed, step
from .gpu_checks import Gpu, GpuRequestError, assign_gpus
from .gpus import GpuState, device_reservation
from .ml_env import EnvPlan, NoEnv
from .probe import ProbePart
from .programs import program
from .releases import Release, new_release, settings_digest
from .transfer import StreamedUpload

HF_HOME = "/root/.cache/huggingface"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # terminal control, but tab
MANIFEST = ".mlstack-files"
PRIVATE = (".env", ".env.digest")  # 0600: the values, and what could hint at them
SALT_LINE = re.compile(rf"^# salt ({SALT.pattern})$", re.M)  # .env.digest's first line


@dataclass(frozen=True)
class ContainerState:
    state: str  # running, exited, created, ...
    health: str  # "", "healthy", "unhealthy", "starting"
    labels: dict[str, str]


@dataclass(frozen=True)
class StackState:
    images: dict[str, str]  # "repository:tag" -> id, for every image on the host
    containers: dict[str, ContainerState]  # compose service -> its container
    texts: dict = field(hash=False)  # file name -> content on the host: compose files, override, digest, manifest
    volumes: frozenset[str] | None = None  # every volume's name, read when the project declares an external one
    networks: frozenset[str] | None = None  # every network's name, likewise
    projects: frozenset[str] = frozenset()  # compose projects with containers started from the compose dir


@dataclass(frozen=True)
class HeldLayers:
    layers: frozenset[str] = frozenset()  # the chain id of every layer of every image on the host
    loads_partial: bool = False  # the classic image store: `docker load` reads no layer it holds


class HeldLayersFact(FactBase):
    """The layers a host holds, for an image about to be sent to it (files/host/image_layers_probe.sh)."""

    def command(self) -> str:
        return program("image_layers_probe.sh")

    def process(self, output: list[str]) -> HeldLayers:
        layers, store = set(), ""
        for line in output:
            if line.startswith("layers "):
                diff_ids = line[7:].split()
                if all(LAYER_ID.fullmatch(diff_id) for diff_id in diff_ids):
                    layers.update(chain_ids(diff_ids))
            elif line.startswith("store "):
                store = line[6:]
        return HeldLayers(frozenset(layers), store.startswith("[") and "io.containerd.snapshotter" not in store)


CONTAINER_LABELS = ("mlstack.config", "mlstack.env-id", "mlstack.models", "mlstack.image")
LAYER_ID = re.compile(r"sha256:[0-9a-f]{64}")
PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # compose's rule for a project name


class StackFact(FactBase):
    """The compose project on the host: its containers' state and mlstack labels, its built images, and the
    text of its compose files, the override, `.env.digest` and `.mlstack-files`; with EXTERNALS, the names of
    the host's volumes and networks (tasks/host/declarations.py)."""

    def command(self, compose_dir: str, project: str, texts: list[str], externals: bool = False) -> str:
        return program("stack_probe.sh", compose_dir, project, ",".join(CONTAINER_LABELS),
                       "yes" if externals else "no", *texts)

    def process(self, output: list[str]) -> StackState:
        images, containers, texts, current, projects = {}, {}, {}, None, set()
        names: dict[str, set[str]] = {"volume": set(), "network": set()}  # the host's, when the probe listed them
        listed, leading = False, bool(output) and output[0] == "externals"  # the names first, then any other record
        for line in output[1:] if leading else output:
            kind = line.partition(" ")[0]
            if leading:
                if line == "externals-end":
                    listed, leading = True, False
                elif kind in names and (name := read_name(line, kind)):
                    names[kind].add(name)
            elif line.startswith("image "):
                tag, _, image_id = line[6:].partition(" ")
                images[tag] = image_id.strip()
            elif line.startswith("container "):
                service, state, status, *values = line[10:].split("|")
                health = next((word for word in ("unhealthy", "healthy", "starting") if word in status), "")
                containers[service] = ContainerState(state, health, dict(zip(CONTAINER_LABELS, values)))
            elif line.startswith("project ") and PROJECT_NAME.fullmatch(line[8:]):
                projects.add(line[8:])
            elif line.startswith("file-begin "):
                current = line.removeprefix("file-begin ")
                texts[current] = []
            elif current and line.startswith("|"):
                texts[current].append(line[2:])
        return StackState(images, containers, {name: "".join(line + "\n" for line in lines)
                                               for name, lines in texts.items()},
                          *(frozenset(names[kind]) if listed else None for kind in ("volume", "network")),
                          frozenset(projects))


def probe_part(config: HostConfig) -> ProbePart:
    project = project_of(config)
    return ProbePart("stack", StackFact, {"compose_dir": config.compose_project_dir, "project": project.name,
                                          "texts": [*project.files, OVERRIDE, ".env.digest", MANIFEST],
                                          "externals": declares_externals(project)})


def escape(value: str) -> str:
    """VALUE as compose must read it literally (no `$` interpolation)."""
    return value.replace("$", "$$")


def dotenv_line(key: str, value: str) -> str:
    """One `.env` line compose reads back as exactly VALUE, for `env_file:` and `${VAR}` alike.

    Double quotes with `\\`, `"`, `$` and newline escaped (rehearsal/compose-facts.md has the proof):
    unquoted values lose ` #…` and expand `$X`; single quotes still treat `\\'` as an escape.
    """
    if "\0" in value:
        raise StackError(f"{key}: a NUL character cannot be passed through .env")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("\n", "\\n")
    return f'{key}="{escaped}"'


def short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Rendered:
    override: str  # compose.mlstack.yml
    dotenv: str  # .env (secrets: never logged)
    digest: str  # .env.digest: key=hash per line
    files: dict = field(hash=False, repr=False)  # relative path -> content: the project's files and the override
    manifest: str = ""  # .mlstack-files: sha256 and path of each of FILES
    labels: dict = field(hash=False, default_factory=dict)  # service -> the mlstack.* labels it carries


def compose_values(config: HostConfig, secrets: dict[str, str]) -> dict[str, str]:
    """What compose interpolates the project with: the runtime base image ref, stack_env, the secrets."""
    return {BASE_IMAGE_VARIABLE: config.ml_env_base_image, **config.stack_env, **secrets}


@dataclass(frozen=True)
class ServiceImage:
    """The image a service runs, as the deploy provides it."""

    reference: str  # a built image's tag, or the registry reference
    source: str = "build"  # "build": built once, shipped; "ship": pulled once, shipped; "pull": the host pulls
    registry: RegistryImage | None = None  # "ship": its digest, and its id where the builder holds it

    @property
    def label(self) -> str:
        return f"{self.reference} ({self.registry.digest[7:19]})" if self.registry else self.reference


def digest_salt(config: HostConfig, digest: str | None) -> str:
    """The salt of the host's `.env.digest` (DIGEST); for a host without one, the control node's own (made
    once, in `image_cache_dir`), so hosts it deployed share one and each value is fingerprinted once."""
    found = SALT_LINE.search(digest or "")
    if found:
        return found.group(1)

    def control_salt() -> str:
        path = Path(config.image_cache_dir).expanduser() / "env-digest.salt"
        salt = path.read_text().strip() if path.exists() else ""
        if not SALT.fullmatch(salt):
            salt = os.urandom(16).hex()
            atomic_write(path, salt)
        return salt

    return once(("salt", config.image_cache_dir), control_salt)


def render_dotenv(project: ComposeProject, config: HostConfig, values: dict[str, str], salt: str
                  ) -> tuple[str, str, dict[str, str]]:
    """The host's one `.env`: the deploy's keys (compose's own settings, then VALUES), then each entry of the
    project's `.env` as written unless the deploy sets its key; with `.env.digest` and key -> fingerprint.
    The deploy's keys come first, so an entry of the project's that refers to one reads the deploy's value."""
    ours = {"COMPOSE_FILE": ":".join((*project.files, OVERRIDE)), "COMPOSE_PROJECT_NAME": project.name,
            "COMPOSE_PROFILES": ",".join(config.stack_profiles), **values}
    theirs = {key: entry for key, entry in project.dotenv.items() if key not in ours}
    fingerprints = {**{key: fingerprint(value, salt) for key, value in ours.items()},
                    **{key: fingerprint(entry, salt) for key, entry in theirs.items()}}
    dotenv = "".join(dotenv_line(key, value) + "\n" for key, value in ours.items())
    dotenv += "".join(entry + "\n" for entry in theirs.values())
    digest = f"# salt {salt}\n" + "".join(f"{key}={value}\n" for key, value in fingerprints.items())
    return dotenv, digest, fingerprints


def render(project: ComposeProject, config: HostConfig, env: EnvPlan | NoEnv, snapshots: list[Snapshot],
           images: dict[str, ServiceImage], gpus: list[Gpu], secrets: dict[str, str], salt: str) -> Rendered:
    values = compose_values(config, secrets)
    dotenv, digest, fingerprints = render_dotenv(project, config, values, salt)
    commits = {snapshot.spec.repo_id: snapshot.commit for snapshot in snapshots}
    services, labels = {}, {}
    for name, definition in project.services.items():
        service: dict = {}
        ours: dict[str, str] = {}
        environment: dict[str, str] = {}
        volumes: list[dict] = []
        image = images.get(name)
        if image and image.source == "build":
            service["image"] = image.reference
        if image and image.source == "ship":
            service["pull_policy"] = "never"  # the deploy brings it: the host needs no way to the registry
        if image:
            ours["mlstack.image"] = escape(image.label)
        uses = config.ml_services.get(name)
        if uses and uses.ml_env:
            volumes.append({"type": "bind", "source": escape(f"{config.ml_env_dir}/envs/{env.wanted}"),
                            "target": "/root/.local", "read_only": True})
            environment.update({key: escape(value) for key, value in env.environment().items()})
            ours["mlstack.env-id"] = env.wanted
        if uses and uses.models:
            volumes.append({"type": "bind", "source": escape(config.model_cache_dir), "target": HF_HOME,
                            "read_only": True})
            environment.update({"HF_HOME": HF_HOME, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
            used = {var: config.service_models[var] for var in uses.models}
            for var, repo_id in used.items():
                environment[var] = escape(repo_id)
                environment[f"{var}_REVISION"] = commits[repo_id]
            ours["mlstack.models"] = escape(",".join(f"{repo}@{commits[repo]}" for repo in sorted(set(used.values()))))
        given = assign_gpus(gpus, name, config.service_gpus[name]) if name in config.service_gpus else []
        if given:
            service["deploy"] = {"resources": {"reservations": device_reservation(given)}}
        if environment:
            service["environment"] = environment
        if volumes:
            service["volumes"] = volumes
        read = {var: fingerprints[var] for var in sorted(project.reads(name)) if var in fingerprints}
        ours["mlstack.config"] = short_hash([definition, service, ours, read])
        service["labels"] = ours
        services[name], labels[name] = service, ours
    override = ("# Generated by the deploy (tasks/host/stack.py): the ML env, models, GPUs and labels.\n"
                + yaml.safe_dump({"services": services}, sort_keys=False, width=1000))
    files = {**project.files_to_ship(), OVERRIDE: override.encode()}
    hashes = {**project.file_hashes(), OVERRIDE: hashlib.sha256(files[OVERRIDE]).hexdigest()}
    manifest = "".join(f"{hashes[path]}  {path}\n" for path in sorted(files))
    return Rendered(override, dotenv, digest, files, manifest, labels)


@dataclass(frozen=True)
class StackPlan:
    send_images: tuple[str, ...]  # images (references) the deploy sends: the host lacks them
    push: bool  # the project's files, the override or .env differ from the host's
    recreate: dict = field(hash=False)  # service -> why it will be (re)created
    rendered: Rendered = field(repr=False)
    release: Release | None = None  # what the stack runs once this plan is carried out

    @property
    def converge(self) -> bool:
        return self.push or bool(self.recreate)


def _reason(old: dict, new: dict) -> str:
    """Why a running service's labels differ: the first of env, models, image that changed, else its config.
    A label the service does not carry reads "" from docker and is absent from ours: both are none."""
    for label, what in (("mlstack.env-id", "env id"), ("mlstack.models", "model commit"), ("mlstack.image", "image")):
        before, after = old.get(label) or "none", new.get(label) or "none"
        if before != after:
            return f"{what} {before} → {after}"
    return "config"


def lacks(state: StackState, image: ServiceImage) -> bool:
    """The host has no image by that reference, or, for a shipped registry image, not the id the registry
    names now (unknown until the builder pulls it: then it is sent)."""
    if image.reference not in state.images:
        return True
    return image.registry is not None and image.registry.id != state.images[image.reference]


def plan_stack(state: StackState, rendered: Rendered, images: dict[str, ServiceImage],
               services: list[str]) -> StackPlan:
    recreate = {}
    for name in services:
        labels = rendered.labels[name]
        running = state.containers.get(name)
        if running is None or running.state != "running":
            recreate[name] = "not running" if running is None else f"{running.state}"
        elif running.labels.get("mlstack.config") != labels["mlstack.config"]:
            recreate[name] = _reason(running.labels, labels)
        elif running.health not in ("", "healthy"):
            recreate[name] = f"{running.health}"
    push = state.texts.get(MANIFEST) != rendered.manifest or state.texts.get(".env.digest") != rendered.digest
    missing = tuple(sorted({image.reference for service, image in images.items()
                            if service in services and image.source != "pull" and lacks(state, image)}))
    return StackPlan(missing, push, recreate, rendered)


def control_secrets(config: HostConfig) -> dict[str, str]:
    """The secrets' values, from the control node's environment (validating the settings checked each is set)."""
    return {name: os.environ[name] for name in config.stack_secrets}


def _image_ready(state, host, reference: str, make_archive) -> bool:
    try:
        once(("image", reference), make_archive)
    except (BuilderError, StackError) as error:
        return failed(host, f"image {reference}: {error}")
    return True


def archive_send_size(archive: Path, held: HeldLayers) -> str | None:
    """What sending ARCHIVE takes to a host holding HELD, for the plan; None while the archive is not made."""
    if not archive.exists():
        return None
    leave_out, total = layers_to_send(archive, held.layers) if held.loads_partial else ((), 0)
    return (f"{total - len(leave_out)} of {total} layers to send, the host holds the rest" if leave_out
            else f"{archive.stat().st_size / 1e6:.1f} MB to send")


def layers_to_send(archive: Path, held: frozenset[str]) -> tuple[tuple[str, ...], int]:
    """Which layer files of ARCHIVE a host holding the layers HELD (chain ids) can do without, and how many it
    has; none for an archive that is not one image's `docker save` (it is sent whole, and loaded as it is)."""
    try:
        layers = once(("layers", archive), lambda: archive_layers(archive))
    except (StackError, OSError, tarfile.TarError):
        return (), 0
    return tuple(sorted(name for name, chain in layers if chain in held)), len(layers)


@operation(is_idempotent=False)
def ship_image(reference: str, make_archive, archive: Path, compose_dir: str, held: tuple[str, ...] = ()):
    """Make the archive once for the fleet (MAKE_ARCHIVE: build or pull, then `docker save | gzip`), then
    `docker load` it on each host that lacks the image, after a sha256 check. A host whose engine skips
    layers it holds gets only the layers it lacks (HELD: the chain ids of those it has, where it skips)."""
    yield FunctionCommand(_image_ready, (reference, make_archive), {})
    leave_out, total = layers_to_send(archive, frozenset(held)) if held else ((), 0)
    if leave_out:
        archive = once(("partial", archive, leave_out), lambda: partial_archive(archive, leave_out))
    label = f"image {reference}" + (f" ({total - len(leave_out)} of {total} layers)" if leave_out else "")
    incoming, q = f"{compose_dir}/.image.tar.gz", shlex.quote
    sha256 = once(("sha256", archive), lambda: file_sha256(archive))
    mismatch = q(f"image {reference}: the archive does not match its sha256; it was removed, run the deploy again")
    yield StreamedUpload(archive, label, incoming, then=(
        f"{{ echo {sha256}'  '{q(incoming)} | sha256sum --check --quiet --strict - "
        f"|| {{ rm -f {q(incoming)}; echo {mismatch} >&2; exit 1; }}; }} "
        f"&& docker load -q -i {q(incoming)} && rm -f {q(incoming)}"))


@operation(is_idempotent=False)
def pull_with_credentials(compose_dir: str, profiles: list[str], services: list[str], registries: list[str],
                          credentials: dict[str, str]):
    """`docker compose pull` of SERVICES on the host, with the logins of REGISTRIES streamed to it on stdin
    (`files/host/pull_images.sh`): before `up`, which would pull without them."""
    yield StreamedUpload(docker_config(credentials, registries), "registry credentials", compose_dir,
                         receiver=program("pull_images.sh", compose_dir, ",".join(profiles), *services))


def project_tar(rendered: Rendered) -> bytes:
    """The project's files, the override, .env and the two records: modes set here, owners root's."""
    buffer = io.BytesIO()
    entries = {**rendered.files, ".env": rendered.dotenv.encode(), ".env.digest": rendered.digest.encode(),
               MANIFEST: rendered.manifest.encode()}
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600 if name in PRIVATE else 0o644, int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@operation(is_idempotent=False)
def bring_down(project: str, compose_dir: str):
    """`docker compose down` of a project by its name (compose finds its containers by their labels): its
    containers and networks go, its volumes stay."""
    yield f"cd {shlex.quote(compose_dir)} && docker compose -p {shlex.quote(project)} down --remove-orphans"


@operation(is_idempotent=False)
def push_project(compose_dir: str, rendered: Rendered):
    """Stage the project in a 0700 directory, validate it there (`docker compose config -q`), then move each
    file into place and remove what the last push placed and this one does not."""
    staged = shlex.quote(f"{compose_dir}/.next")
    yield f"rm -rf {staged} && install -d -m 0700 {staged}"
    # streamed into a directory only root can read: the .env never passes through a readable copy
    yield StreamedUpload(project_tar(rendered), "compose project", f"{compose_dir}/.next/project.tar")
    yield program("install_project.sh", compose_dir)


def gate_outcome(project: str, timeout: int, services: list[str], records: list[str]) -> tuple[list[str], str]:
    """The services the health gate found failing (only names of SERVICES count) and the failure's message,
    from its RECORDS (stdout lines): compose's own message where `up` itself failed (`up-failed` lines, control
    characters shown escaped), else the services not healthy within TIMEOUT."""
    failing = [line.split(" ", 1)[1] for line in records if line.startswith("failing ")]
    unhealthy = [name for name in failing if name in services]
    said = [CONTROL.sub(lambda match: repr(match[0])[1:-1], line.removeprefix("up-failed ").strip())
            for line in records if line.startswith("up-failed ")]
    if said:
        return unhealthy, f"stack {project}: docker compose up failed: {' / '.join(said)[-1500:]}"
    return unhealthy, (f"stack {project}: not healthy within {timeout}s: " + (", ".join(unhealthy) or "see the log"))


class HealthGate(StringCommand):
    """`files/host/health_gate.sh`: up, wait for health. What it finds failing goes to the report; only
    names of this project's services count."""

    def __init__(self, project: str, compose_dir: str, profiles: list[str], timeout: int, services: list[str]):
        super().__init__(program("health_gate.sh", compose_dir, project, timeout, ",".join(profiles)))
        self.project, self.timeout, self.services = project, timeout, services

    def execute(self, state, host, connector_arguments):
        status, output = super().execute(state, host, connector_arguments)
        record = report[host.name]
        unhealthy, message = gate_outcome(self.project, self.timeout, self.services, output.stdout_lines)
        if record.stack is not None:
            record.stack.health = "healthy" if status else "unhealthy"
            record.stack.unhealthy = unhealthy
        if not status:
            record.pending = message
        return status, output


def check_url(template: str, address: str) -> str:
    """An `http_checks` entry for one host: `{host}` is the address the control node reaches it at."""
    return template.replace("{host}", f"[{address}]" if ":" in address else address)


def ask(url: str, deadline: float) -> str:
    """'' once URL answers 2xx or 3xx before DEADLINE (asked every 2 s, no proxy), else the last problem."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            with opener.open(url, timeout=5) as response:
                if response.status < 400:
                    return ""
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            problem = f"HTTP {error.code}"
        except (OSError, ValueError) as error:
            problem = str(getattr(error, "reason", None) or error)
        if time.monotonic() + 2 > deadline:
            return problem
        time.sleep(2)


def _checks_pass(state, host, project: str, templates: list[str], timeout: int) -> bool:
    """The `http_checks`, made by the control node against the host, as a person would check the service."""
    address = host.data.get("ssh_hostname") or host.name
    deadline = time.monotonic() + timeout
    failing = [f"check {url}: {problem}" for url in (check_url(template, address) for template in templates)
               if (problem := ask(url, deadline))]
    record = report[host.name]
    if not failing:
        return True
    if record.stack is not None:
        record.stack.health = "unhealthy"
        record.stack.unhealthy = failing
    return failed(host, f"stack {project}: " + ", ".join(failing))


@operation(is_idempotent=False)
def converge_stack(project: str, compose_dir: str, profiles: list[str], timeout: int, checks: list[str],
                   services: list[str]):
    """Compose recreates exactly the services whose config hash changed; then the health gate: compose's
    healthchecks on the host, then the HTTP checks from the control node."""
    yield HealthGate(project, compose_dir, profiles, timeout, services)
    if checks:
        yield FunctionCommand(_checks_pass, (project, checks, timeout), {})


def _diff(old: str | None, new: str, name: str) -> list[str]:
    """A unified diff for the log; control characters shown escaped (the host's side is read back from it)."""
    lines = difflib.unified_diff((old or "").splitlines(), new.splitlines(), f"{name} (host)", f"{name} (new)",
                                 lineterm="")
    return [CONTROL.sub(lambda match: repr(match[0])[1:-1], line) for line in lines]


def masked_env_diff(old_digest: str | None, new_digest: str) -> list[str]:
    """Which .env keys are added, removed or changed; values are never shown."""
    old = dict(line.split("=", 1) for line in (old_digest or "").splitlines() if "=" in line)
    new = dict(line.split("=", 1) for line in new_digest.splitlines() if "=" in line)
    lines = [f"+ {key}=***" for key in new if key not in old]
    lines += [f"- {key}=***" for key in old if key not in new]
    lines += [f"~ {key}=*** (changed)" for key in new if key in old and old[key] != new[key]]
    return lines


def archive_of(config: HostConfig, image: ServiceImage) -> Path:
    """Where the control cache keeps IMAGE's `docker save | gzip`: by tag when built, by digest when pulled."""
    name = image.reference.replace(":", "-") if image.registry is None else f"pulled-{image.registry.digest[7:23]}"
    return Path(config.image_cache_dir).expanduser() / f"{name}.tar.gz"


def stack_base(config: HostConfig, project: ComposeProject, host_image: str | None) -> BaseImage | None:
    """The runtime base image the project's images are built on when no env is wanted: only a `build:` service
    that reads ${MLSTACK_BASE_IMAGE} needs its id (its image's tag names it; the builder must hold it), from the
    host's copy (HOST_IMAGE) where an earlier probe recorded it, else from the builder. None when no build reads
    it: the builder is not asked."""
    if not any("build" in spec and BASE_IMAGE_VARIABLE in project.reads(name)
               for name, spec in project.services.items()):
        return None
    return base_image(config, Path(config.ml_env_cache_dir).expanduser(), host_image)


def service_images(project: ComposeProject, resolved: dict, config: HostConfig, base: BaseImage | None
                   ) -> tuple[dict[str, ServiceImage], dict[str, object]]:
    """Each service's image, and for each image the deploy sends, how its archive is made (once per fleet).
    BASE None: no build reads the base image (`stack_base`), so no tag names it."""
    images, makers = {}, {}
    base_id = base.id if base else ""
    for build in project.builds(resolved):
        tag = once(("tag", build, base_id), lambda build=build: image_tag(project, build, base_id))
        images[build.service] = image = ServiceImage(tag)
        makers[tag] = partial(build_and_save, build, tag, base, config.ml_env_builder, archive_of(config, image))
    for service, reference in registry_images(resolved).items():
        if "@" not in reference and ":" not in reference.rpartition("/")[2]:
            reference += ":latest"  # as `docker images` lists it
        if config.image_source == "pull":
            images[service] = ServiceImage(reference, source="pull")
            continue
        registry = once(("registry", reference), lambda reference=reference: inspect_on_builder(
            reference, config.ml_env_builder, config.registry_credentials))
        images[service] = image = ServiceImage(reference, "ship", registry)
        makers[reference] = partial(pull_and_save, registry, config.ml_env_builder, config.registry_credentials,
                                    archive_of(config, image))
    return images, makers


def release_of(config: HostConfig, project: ComposeProject, rendered: Rendered, env: EnvPlan | NoEnv,
               snapshots: list[Snapshot], images: dict[str, ServiceImage], services: list[str]) -> Release:
    """The release this stack makes (tasks/host/releases.py): its files and .env as fingerprinted, the env,
    the models' commits and each active service's image."""
    return new_release(project.name, hashlib.sha256((rendered.manifest + rendered.digest).encode()).hexdigest(),
                       env.wanted if isinstance(env, EnvPlan) else None,
                       {snapshot.spec.folder: snapshot.commit for snapshot in snapshots},
                       {name: images[name].label for name in services if name in images},
                       settings_digest(config), tuple(config.stack_profiles))


@step("Stack")
def converge(config: HostConfig, env: EnvPlan | NoEnv | None, snapshots: list[Snapshot], state: StackState,
             host_gpus: GpuState) -> StackPlan | None:
    if env is None:
        return None  # the host failed its ML env check; it is reported there (NoEnv: no env is wanted)
    project = project_of(config)
    services = project.active(config.stack_profiles)
    gpus = list(host_gpus.gpus)
    if gpus and host_gpus.docker_gpus == "cdi" and set(config.service_gpus) & set(services):
        raise HostProblem("service_gpus: this host's docker gives containers GPUs through CDI only, and compose "
                          "reservations here name the nvidia runtime: run `nvidia-ctk runtime configure "
                          "--runtime=docker` on it (CDI reservations are not supported yet)")
    secrets = control_secrets(config)
    try:
        base = env.base if isinstance(env, EnvPlan) else stack_base(config, project, env.host_image)
        values = tuple(sorted(compose_values(config, secrets).items()))
        declared = declaration_problems(resolved_config(project, values), services, state.volumes, state.networks,
                                        gpus, host_gpus.docker_gpus, host_gpus.runtimes)
        if declared:  # what the project itself asks of the host, before anything on it changes
            raise HostProblem("; ".join(declared))
        images, makers = service_images(project, resolved_config(project, values), config, base)
        rendered = render(project, config, env, snapshots, images, gpus, secrets,
                          digest_salt(config, state.texts.get(".env.digest")))
    except (StackError, BuilderError, GpuRequestError) as error:
        raise HostProblem(error) from None
    plan = replace(plan_stack(state, rendered, images, services),
                   release=release_of(config, project, rendered, env, snapshots, images, services))
    outcome = StackOutcome(project.name, sorted({images[name].label for name in services if name in images}), {
        name: ServiceOutcome("keep") if name not in plan.recreate
        else ServiceOutcome("recreate" if name in state.containers else "create", plan.recreate[name])
        for name in services})
    report[host.name].stack = outcome
    if not (plan.send_images or plan.converge):
        healthy = sum(c.state == "running" and c.health in ("", "healthy") for c in state.containers.values())
        host.log(f"stack {project.name}: no change "
                 f"({healthy}/{len(state.containers)} services running and healthy)")
        outcome.health = "healthy"  # a service that is not would be recreated
        return plan
    report[host.name].changed("stack")
    by_reference = {image.reference: image for image in images.values()}
    held = host.get_fact(HeldLayersFact) if plan.send_images else HeldLayers()
    for reference in plan.send_images:
        archive = archive_of(config, by_reference[reference])
        registry = by_reference[reference].registry
        size = archive_send_size(archive, held) or ("to build once, then send" if registry is None
                                                    else f"{registry.size / 1e6:.1f} MB unpacked, to save once, "
                                                         "then send" if registry.id
                                                    else "to pull once on the builder, then send")
        host.log(f"stack {project.name}: image {reference} ({size})")
    for reference in sorted({image.reference for name, image in images.items()
                             if image.source == "pull" and name in services and image.reference not in state.images}):
        host.log(f"stack {project.name}: image {reference} (the host pulls it)")
    for other in sorted(state.projects - {project.name}):
        host.log(f"stack {project.name}: replaces project {other} (brought down first; its named volumes stay)")
    kept = [name for name in services if name not in plan.recreate]
    host.log(f"stack {project.name}: "
             + (", ".join(f"{service} ({why})" for service, why in plan.recreate.items())
                or "files only, no service recreated")
             + (f"; kept: {', '.join(kept)}" if kept and plan.recreate else ""))
    if pyinfra_state.config.DIFF:
        for name in (*project.files, OVERRIDE):
            for line in _diff(state.texts.get(name), rendered.files[name].decode("utf-8", "replace"), name):
                host.log(f"  {line}")
        for line in masked_env_diff(state.texts.get(".env.digest"), rendered.digest):
            host.log(f"  {line}")
    for other in sorted(state.projects - {project.name}):  # what ran from this directory before: its own files
        bring_down(name=f"Bring project {other} down (replaced by {project.name}; its volumes stay)",
                   project=other, compose_dir=config.compose_project_dir)
    for reference in plan.send_images:
        ship_image(name=f"Image {reference}", reference=reference, make_archive=makers[reference],
                   archive=archive_of(config, by_reference[reference]), compose_dir=config.compose_project_dir,
                   held=tuple(sorted(held.layers)) if held.loads_partial else ())
    if plan.push:
        push_project(name=f"Compose project {project.name}", compose_dir=config.compose_project_dir,
                     rendered=rendered)
    pulling = {name: image for name, image in images.items() if image.source == "pull" and name in services
               and lacks(state, image) and registry_of(image.reference) in config.registry_credentials}
    if pulling and plan.converge:
        pull_with_credentials(name=f"Pull with registry logins: {', '.join(sorted(pulling))}",
                              compose_dir=config.compose_project_dir, profiles=config.stack_profiles,
                              services=sorted(pulling),
                              registries=sorted({registry_of(image.reference) for image in pulling.values()}),
                              credentials=config.registry_credentials)
    if plan.converge:
        converge_stack(name=f"Up and healthy: {project.name}", project=project.name,
                       compose_dir=config.compose_project_dir, profiles=config.stack_profiles,
                       timeout=config.health_timeout, checks=list(config.http_checks), services=services)
    return plan
