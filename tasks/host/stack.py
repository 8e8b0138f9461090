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

Here: the two facts, the plan and the step; the files are rendered in stack_render.py, images
shipped in stack_images.py, the project pushed in stack_push.py, the health gate is stack_health.py.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pyinfra import host
from pyinfra import state as pyinfra_state
from pyinfra.api import FactBase

from ..config import HostConfig
from ..control.builder import BaseImage, BuilderError
from ..control.caches import once
from ..control.compose_project import (
    BASE_IMAGE_VARIABLE,
    OVERRIDE,
    ComposeProject,
    StackError,
    project_of,
)
from ..control.hub import Snapshot
from ..control.registry import (
    inspect_on_builder,
    pull_and_save,
    registry_images,
    registry_of,
)
from ..control.stack_project import build_and_save, remembered_tag
from ..report import ServiceOutcome, StackOutcome, report
from .declarations import declaration_problems, declares_externals, read_name
from .failure import HostProblem, step
from .gpu_checks import GpuRequestError
from .gpus import GpuState
from .ml_env import EnvPlan, NoEnv
from .probe import ProbePart
from .programs import program
from .releases import Release, new_release, settings_digest
from .stack_health import CONTROL, converge_stack
from .stack_images import (
    HeldLayers,
    HeldLayersFact,
    ServiceImage,
    archive_of,
    archive_send_size,
    image_fan_out,
    pull_with_credentials,
    ship_image,
)
from .stack_push import bring_down, push_project
from .stack_render import MANIFEST, Rendered, compose_values, digest_salt, render

if TYPE_CHECKING:
    from ..control.fleet_context import FleetContext

CONTAINER_LABELS = ("mlstack.config", "mlstack.env-id", "mlstack.models", "mlstack.image")


# How the archive of an image the deploy sends is made, once per fleet: build or pull, then `docker save | gzip`.
ArchiveMaker = Callable[[], Path]

PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # compose's rule for a project name


@dataclass(frozen=True)
class ContainerState:
    state: str  # running, exited, created, ...
    health: str  # "", "healthy", "unhealthy", "starting"
    labels: dict[str, str]


@dataclass(frozen=True)
class StackState:
    images: dict[str, str]  # "repository:tag" -> id, for every image on the host
    containers: dict[str, ContainerState]  # compose service -> its container
    texts: dict[str, str] = field(hash=False)  # name -> content on the host: compose files, override, digest, manifest
    volumes: frozenset[str] | None = None  # every volume's name, read when the project declares an external one
    networks: frozenset[str] | None = None  # every network's name, likewise
    projects: frozenset[str] = frozenset()  # compose projects with containers started from the compose dir


class StackFact(FactBase):
    """The compose project on the host: its containers' state and mlstack labels, its built images, and the
    text of its compose files, the override, `.env.digest` and `.mlstack-files`; with EXTERNALS, the names of
    the host's volumes and networks (tasks/host/declarations.py)."""

    def command(self, compose_dir: str, project: str, texts: list[str], externals: bool = False) -> str:
        return program("stack_probe.sh", compose_dir, project, ",".join(CONTAINER_LABELS),
                       "yes" if externals else "no", *texts)

    def process(self, output: list[str]) -> StackState:
        images, containers, current, projects = {}, {}, None, set()
        texts: dict[str, list[str]] = {}  # file name -> its lines
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
                # strict=False: a label value holding "|" splits into more values than labels
                containers[service] = ContainerState(state, health, dict(zip(CONTAINER_LABELS, values, strict=False)))
            elif line.startswith("project ") and PROJECT_NAME.fullmatch(line[8:]):
                projects.add(line[8:])
            elif line.startswith("file-begin "):
                current = line.removeprefix("file-begin ")
                texts[current] = []
            elif current and line.startswith("|"):
                texts[current].append(line[2:])
        return StackState(images, containers, {name: "".join(line + "\n" for line in lines)
                                               for name, lines in texts.items()},
                          volumes=frozenset(names["volume"]) if listed else None,
                          networks=frozenset(names["network"]) if listed else None,
                          projects=frozenset(projects))


def probe_part(config: HostConfig) -> ProbePart:
    project = project_of(config)
    return ProbePart("stack", StackFact, {"compose_dir": config.compose_project_dir, "project": project.name,
                                          "texts": [*project.files, OVERRIDE, ".env.digest", MANIFEST],
                                          "externals": declares_externals(project)})


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


def stack_base(config: HostConfig, fleet: FleetContext, project: ComposeProject, host_image: str | None
               ) -> BaseImage | None:
    """The runtime base image the project's images are built on when no env is wanted: only a `build:` service
    that reads ${MLSTACK_BASE_IMAGE} needs its id (its image's tag names it; the builder must hold it), from the
    host's copy (HOST_IMAGE) where an earlier probe recorded it, else from the builder. None when no build reads
    it: the builder is not asked."""
    if not any("build" in spec and BASE_IMAGE_VARIABLE in project.reads(name)
               for name, spec in project.services.items()):
        return None
    return fleet.base_image(config, host_image)


def service_images(project: ComposeProject, resolved: dict, config: HostConfig, base: BaseImage | None,
                   values: tuple[tuple[str, str], ...] = ()) -> tuple[dict[str, ServiceImage], dict[str, ArchiveMaker]]:
    """Each service's image, and for each image the deploy sends, how its archive is made (once per fleet).
    BASE None: no build reads the base image (`stack_base`), so no tag names it. VALUES: what compose
    interpolates RESOLVED from, for the build (`build.secrets` from `environment:` read them)."""
    images: dict[str, ServiceImage] = {}
    makers: dict[str, ArchiveMaker] = {}
    base_id = base.id if base else ""
    for build in project.builds(resolved):
        tag = once(("tag", build, base_id), lambda build=build: remembered_tag(
            Path(config.image_cache_dir).expanduser(), project, build, base_id))
        images[build.service] = image = ServiceImage(tag)
        makers[tag] = partial(build_and_save, project, build, values, tag, base, config.ml_env_builder,
                              config.registry_credentials, archive_of(config, image))
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
def converge(config: HostConfig, fleet: FleetContext, env: EnvPlan | NoEnv | None, snapshots: list[Snapshot],
             state: StackState, host_gpus: GpuState) -> StackPlan | None:
    if env is None:
        return None  # the host failed its ML env check; it is reported there (NoEnv: no env is wanted)
    project = fleet.project(config)
    services = project.active(config.stack_profiles)
    refuse_cdi(config, host_gpus, services)
    images, makers, rendered = prepare(config, fleet, env, snapshots, state, host_gpus, project, services)
    plan = replace(plan_stack(state, rendered, images, services),
                   release=release_of(config, project, rendered, env, snapshots, images, services))
    outcome = stack_outcome(project, images, plan, state, services)
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
    log_plan(config, project, state, plan, images, by_reference, held, services)
    peers_image = env.base if isinstance(env, EnvPlan) else None  # the runtime image the host holds
    carry_out(config, project, state, plan, images, makers, by_reference, held, services, peers_image)
    return plan


def refuse_cdi(config: HostConfig, host_gpus: GpuState, services: list[str]) -> None:
    gpus = list(host_gpus.gpus)
    if gpus and host_gpus.docker_gpus == "cdi" and set(config.service_gpus) & set(services):
        raise HostProblem("service_gpus: this host's docker gives containers GPUs through CDI only, and compose "
                          "reservations here name the nvidia runtime: run `nvidia-ctk runtime configure "
                          "--runtime=docker` on it (CDI reservations are not supported yet)")


def prepare(config: HostConfig, fleet: FleetContext, env: EnvPlan | NoEnv, snapshots: list[Snapshot],
            state: StackState, host_gpus: GpuState, project: ComposeProject, services: list[str]
            ) -> tuple[dict[str, ServiceImage], dict[str, ArchiveMaker], Rendered]:
    """Each service's image (and how each sent one is made) and the rendered files, once what the project itself
    asks of the host is there; a problem found fails the host before anything on it changes."""
    gpus = list(host_gpus.gpus)
    secrets = control_secrets(config)
    try:
        base = env.base if isinstance(env, EnvPlan) else stack_base(config, fleet, project, env.host_image)
        values = tuple(sorted(compose_values(config, secrets).items()))
        resolved = fleet.resolved(project, values)
        declared = declaration_problems(resolved, services, state.volumes, state.networks, gpus,
                                        host_gpus.docker_gpus, host_gpus.runtimes)
        if declared:  # what the project itself asks of the host, before anything on it changes
            raise HostProblem("; ".join(declared))
        images, makers = service_images(project, resolved, config, base, values)
        rendered = render(project, config, env, snapshots, images, gpus, secrets,
                          digest_salt(config, state.texts.get(".env.digest")))
    except (StackError, BuilderError, GpuRequestError) as error:
        raise HostProblem(error) from None
    return images, makers, rendered


def stack_outcome(project: ComposeProject, images: dict[str, ServiceImage], plan: StackPlan, state: StackState,
                  services: list[str]) -> StackOutcome:
    """What the report says of the stack before anything runs: its images, and each service kept or (re)created."""
    return StackOutcome(project.name, sorted({images[name].label for name in services if name in images}), {
        name: ServiceOutcome("keep") if name not in plan.recreate
        else ServiceOutcome("recreate" if name in state.containers else "create", plan.recreate[name])
        for name in services})


def log_plan(config: HostConfig, project: ComposeProject, state: StackState, plan: StackPlan,
             images: dict[str, ServiceImage], by_reference: dict[str, ServiceImage], held: HeldLayers,
             services: list[str]) -> None:
    """The plan in the log: images sent or pulled, projects replaced, services recreated; with --diff, the files'
    diffs and the .env keys changed (never their values)."""
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
            for line in _diff(state.texts.get(name), plan.rendered.files[name].decode("utf-8", "replace"), name):
                host.log(f"  {line}")
        for line in masked_env_diff(state.texts.get(".env.digest"), plan.rendered.digest):
            host.log(f"  {line}")


def carry_out(config: HostConfig, project: ComposeProject, state: StackState, plan: StackPlan,
              images: dict[str, ServiceImage], makers: dict[str, ArchiveMaker], by_reference: dict[str, ServiceImage],
              held: HeldLayers, services: list[str], base: BaseImage | None) -> None:
    """The operations, in order: projects replaced brought down, images shipped (hosts feeding hosts where they
    can: BASE runs the peers), the project pushed, registry images pulled with their logins, then up behind the
    health gate."""
    for other in sorted(state.projects - {project.name}):  # what ran from this directory before: its own files
        bring_down(name=f"Bring project {other} down (replaced by {project.name}; its volumes stay)",
                   project=other, compose_dir=config.compose_project_dir)
    layers = tuple(sorted(held.layers)) if held.loads_partial else ()
    for reference in plan.send_images:
        archive = archive_of(config, by_reference[reference])
        ship_image(name=f"Image {reference}", reference=reference, make_archive=makers[reference], archive=archive,
                   compose_dir=config.compose_project_dir, held=layers,
                   fan=image_fan_out(config, reference, archive, base) if base else None)
    if plan.push:
        push_project(name=f"Compose project {project.name}", compose_dir=config.compose_project_dir,
                     rendered=plan.rendered)
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
