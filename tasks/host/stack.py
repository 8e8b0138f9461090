"""The stack on a host: the compose project built as data, the slim image shipped, pushed, validated
on the host, then brought up — recreating exactly the services whose config changed — behind a health gate.

The compose document is a dict dumped with PyYAML. Values the deploy injects (paths, model ids,
commits, settings) have `$` doubled so compose never interpolates them; what a stack author wrote
in `files/stacks/<name>/stack.yml` keeps compose's own syntax. Secrets live only in `.env` (0600),
written by `dotenv_line`; `.env.digest` (key → hash of value) lets later runs see what changed
without reading a secret back.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pyinfra import host
from pyinfra import state as pyinfra_state
from pyinfra.api import FactBase, FunctionCommand, StringCommand, operation

from tasks.config import HostConfig
from tasks.control.builder import BaseImage, BuilderError
from tasks.control.caches import file_sha256, once
from tasks.control.hub import Snapshot
from tasks.control.stack_project import StackDef, StackError, build_and_save, image_tag
from tasks.host.failure import HostProblem, failed, step
from tasks.host.gpu_checks import Gpu, GpuRequestError, assign_gpus
from tasks.host.gpus import device_reservation
from tasks.host.ml_env import EnvPlan
from tasks.host.probe import ProbePart
from tasks.host.programs import program
from tasks.host.transfer import StreamedUpload
from tasks.report import ServiceOutcome, StackOutcome, report

OUR_KEYS = ("mounts", "models", "http_checks")  # stack.yml keys the deploy consumes; the rest is compose's
HF_HOME = "/root/.cache/huggingface"


@dataclass(frozen=True)
class ContainerState:
    state: str  # running, exited, created, ...
    health: str  # "", "healthy", "unhealthy", "starting"
    labels: dict[str, str]


@dataclass(frozen=True)
class StackState:
    images: dict[str, str]  # "repository:tag" -> id, for the stack's image repository on the host
    containers: dict[str, ContainerState]  # compose service -> its container
    compose: str | None  # the docker-compose.yml in place
    digest: str | None  # .env.digest in place (key=hash lines: no secret)


CONTAINER_LABELS = ("mlstack.config", "mlstack.env-id", "mlstack.models", "mlstack.image")


class StackFact(FactBase):
    """The compose project on the host: its files, its containers' state and mlstack labels, the stack's images."""

    def command(self, compose_dir: str, project: str, repository: str) -> str:
        return program("stack_probe.sh", compose_dir, project, repository, *CONTAINER_LABELS)

    def process(self, output: list[str]) -> StackState:
        images, containers, texts, current = {}, {}, {}, None
        for line in output:
            if line.startswith("image "):
                tag, _, image_id = line[6:].partition(" ")
                images[tag] = image_id.strip()
            elif line.startswith("container "):
                service, state, status, *values = line[10:].split("|")
                health = next((word for word in ("unhealthy", "healthy", "starting") if word in status), "")
                containers[service] = ContainerState(state, health, dict(zip(CONTAINER_LABELS, values)))
            elif line in ("file-begin docker-compose.yml", "file-begin .env.digest"):
                current = line.removeprefix("file-begin ")
                texts[current] = []
            elif current and line.startswith("|"):
                texts[current].append(line[2:])
        return StackState(
            images=images,
            containers=containers,
            compose=("".join(line + "\n" for line in texts["docker-compose.yml"])
                     if "docker-compose.yml" in texts else None),
            digest="".join(line + "\n" for line in texts[".env.digest"]) if ".env.digest" in texts else None,
        )


def probe_part(config: HostConfig) -> ProbePart:
    definition = StackDef.load(config.stack)
    return ProbePart("stack", StackFact, {"compose_dir": config.compose_project_dir, "project": definition.project,
                                          "repository": definition.repository})


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
    compose: str  # docker-compose.yml
    dotenv: str  # .env (secrets: never logged)
    digest: str  # .env.digest: key=hash per line
    labels: dict = field(hash=False)  # service -> the mlstack.* labels it carries


def render(stack: StackDef, config: HostConfig, env: EnvPlan, snapshots: list[Snapshot], tag: str,
           gpus: list[Gpu], secrets: dict[str, str]) -> Rendered:
    values = {**config.stack_env, **secrets}
    dotenv = "".join(dotenv_line(key, value) + "\n" for key, value in values.items())
    digest = "".join(f"{key}={short_hash(value)}\n" for key, value in values.items())
    commits = {snapshot.spec.repo_id: snapshot.commit for snapshot in snapshots}
    services, labels = {}, {}
    for name, spec in stack.services.items():
        service = {key: value for key, value in spec.items() if key not in OUR_KEYS}
        service.setdefault("image", tag)
        service.setdefault("pull_policy", "never")
        service["network_mode"] = "host"  # hosts may run docker without its bridge (--bridge=none)
        service.setdefault("restart", "unless-stopped")
        environment = {key: str(value) for key, value in (service.get("environment") or {}).items()}
        volumes = list(service.get("volumes") or [])
        ours = {"mlstack.image": escape(tag)}
        if "ml_env" in spec.get("mounts", []):
            volumes.append({"type": "bind", "source": escape(f"{config.ml_env_dir}/envs/{env.wanted}"),
                            "target": "/root/.local", "read_only": True})
            environment.update({key: escape(value) for key, value in env.environment().items()})
            ours["mlstack.env-id"] = env.wanted
        given = assign_gpus(gpus, name, config.service_gpus[name]) if name in config.service_gpus else []
        if given:
            service.setdefault("deploy", {}).setdefault("resources", {})["reservations"] = device_reservation(given)
        if "models" in spec.get("mounts", []):
            volumes.append({"type": "bind", "source": escape(config.model_cache_dir), "target": HF_HOME,
                            "read_only": True})
            environment.update({"HF_HOME": HF_HOME, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
            used = {var: config.service_models[var] for var in spec.get("models", [])}
            for var, repo_id in used.items():
                environment[var] = escape(repo_id)
                environment[f"{var}_REVISION"] = commits[repo_id]
            ours["mlstack.models"] = escape(",".join(f"{repo}@{commits[repo]}" for repo in sorted(set(used.values()))))
        if values:
            service["env_file"] = [".env"]
        if environment:
            service["environment"] = environment
        if volumes:
            service["volumes"] = volumes
        ours["mlstack.config"] = short_hash([service, ours, digest])
        service["labels"] = {**(service.get("labels") or {}), **ours}
        services[name], labels[name] = service, ours
    compose = yaml.safe_dump({"name": stack.project, "services": services}, sort_keys=False, width=1000)
    return Rendered(compose, dotenv, digest, labels)


@dataclass(frozen=True)
class StackPlan:
    send_image: bool
    push: bool  # docker-compose.yml or .env differ from the host's
    recreate: dict = field(hash=False)  # service -> why it will be (re)created
    rendered: Rendered = field(repr=False)

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


def active_services(stack: StackDef, profiles: list[str]) -> list[str]:
    """The services that run with PROFILES: those without a profile, and those in one of them."""
    return [name for name, spec in stack.services.items()
            if not spec.get("profiles") or set(spec["profiles"]) & set(profiles)]


def plan_stack(state: StackState, rendered: Rendered, tag: str, profiles: list[str], stack: StackDef) -> StackPlan:
    recreate = {}
    for name in active_services(stack, profiles):
        labels = rendered.labels[name]
        running = state.containers.get(name)
        if running is None or running.state != "running":
            recreate[name] = "not running" if running is None else f"{running.state}"
        elif running.labels.get("mlstack.config") != labels["mlstack.config"]:
            recreate[name] = _reason(running.labels, labels)
        elif running.health not in ("", "healthy"):
            recreate[name] = f"{running.health}"
    push = state.compose != rendered.compose or state.digest != rendered.digest
    return StackPlan(tag not in state.images, push, recreate, rendered)


def control_secrets(config: HostConfig) -> dict[str, str]:
    missing = [name for name in config.stack_secrets if name not in os.environ]
    if missing:
        raise StackError(f"{host.name}: stack_secrets = {config.stack_secrets!r}: expected {', '.join(missing)} "
                         "in the control node's environment (export it before the deploy)")
    return {name: os.environ[name] for name in config.stack_secrets}


def _image_ready(state, host, stack: StackDef, tag: str, base: BaseImage, builder: str, archive: Path) -> bool:
    try:
        once(("image", tag), lambda: build_and_save(stack, tag, base, builder, archive))
    except (BuilderError, StackError) as error:
        return failed(host, f"image {tag}: {error}")
    return True


@operation(is_idempotent=False)
def ship_image(stack: StackDef, tag: str, base: BaseImage, builder: str, archive: Path, compose_dir: str):
    """Build once for the fleet, then `docker load` on each host that lacks the tag."""
    yield FunctionCommand(_image_ready, (stack, tag, base, builder, archive), {})
    incoming, q = f"{compose_dir}/.image.tar.gz", shlex.quote
    sha256 = once(("sha256", archive), lambda: file_sha256(archive))
    mismatch = q(f"image {tag}: the archive does not match its sha256; it was removed, run the deploy again")
    yield StreamedUpload(archive, f"image {tag}", incoming, then=(
        f"{{ echo {sha256}'  '{q(incoming)} | sha256sum --check --quiet --strict - "
        f"|| {{ rm -f {q(incoming)}; echo {mismatch} >&2; exit 1; }}; }} "
        f"&& docker load -q -i {q(incoming)} && rm -f {q(incoming)}"))


def compose_args(project: str, compose_dir: str, profiles: list[str], subdir: str = "") -> str:
    where = f"{compose_dir}/{subdir}" if subdir else compose_dir
    return (f"docker compose -p {shlex.quote(project)} --project-directory {shlex.quote(where)} "
            f"-f {shlex.quote(where + '/docker-compose.yml')}"
            + "".join(f" --profile {shlex.quote(profile)}" for profile in profiles))


@operation(is_idempotent=False)
def push_compose(project: str, compose_dir: str, rendered: Rendered, profiles: list[str]):
    """Validate the new project on the host (`docker compose config -q`) before it replaces the old one."""
    q, staged = shlex.quote, f"{compose_dir}/.next"
    yield f"rm -rf {q(staged)} && install -d -m 0700 {q(staged)}"
    # streamed into files only root can read: the .env never passes through a temporary copy
    yield StreamedUpload(rendered.compose.encode(), "compose file", f"{staged}/docker-compose.yml")
    yield StreamedUpload(rendered.dotenv.encode(), ".env", f"{staged}/.env")
    yield StreamedUpload(rendered.digest.encode(), ".env digest", f"{staged}/.env.digest")
    yield f"{compose_args(project, compose_dir, profiles, '.next')} config -q"
    yield (f"cd {q(compose_dir)} && chmod 0640 .next/docker-compose.yml "
           "&& mv -f .next/docker-compose.yml docker-compose.yml "
           "&& mv -f .next/.env .env && mv -f .next/.env.digest .env.digest && rmdir .next")


class HealthGate(StringCommand):
    """`files/host/health_gate.sh`: up, wait for health, ask the HTTP checks. What it finds failing
    goes to the report; only names of this project's services count."""

    def __init__(self, project: str, compose_dir: str, profiles: list[str], timeout: int, checks: list[str],
                 services: list[str]):
        super().__init__(program("health_gate.sh", compose_dir, project, timeout, ",".join(profiles), *checks))
        self.project, self.timeout, self.services, self.checks = project, timeout, services, checks

    def execute(self, state, host, connector_arguments):
        status, output = super().execute(state, host, connector_arguments)
        record = report[host.name]
        failing = [line.split(" ", 1)[1] for line in output.stdout_lines if line.startswith("failing ")]
        unhealthy = [name for name in failing if name in self.services]
        checks = [line.split(" ", 1)[1] for line in output.stdout_lines if line.startswith("failing-check ")]
        if record.stack is not None:
            record.stack.health = "healthy" if status else "unhealthy"
            record.stack.unhealthy = unhealthy + [f"check {url}" for url in checks if url in self.checks]
        if not status:
            record.pending = (f"stack {self.project}: not healthy within {self.timeout}s: "
                              + (", ".join(record.stack.unhealthy) if record.stack and record.stack.unhealthy
                                 else "see the log"))
        return status, output


@operation(is_idempotent=False)
def converge_stack(project: str, compose_dir: str, profiles: list[str], timeout: int, checks: list[str],
                   services: list[str]):
    """Compose recreates exactly the services whose config hash changed; then the health gate."""
    yield HealthGate(project, compose_dir, profiles, timeout, checks, services)


def _diff(old: str | None, new: str, name: str) -> list[str]:
    return list(difflib.unified_diff((old or "").splitlines(), new.splitlines(), f"{name} (host)", f"{name} (new)",
                                     lineterm=""))


def masked_env_diff(old_digest: str | None, new_digest: str) -> list[str]:
    """Which .env keys are added, removed or changed; values are never shown."""
    old = dict(line.split("=", 1) for line in (old_digest or "").splitlines() if "=" in line)
    new = dict(line.split("=", 1) for line in new_digest.splitlines() if "=" in line)
    lines = [f"+ {key}=***" for key in new if key not in old]
    lines += [f"- {key}=***" for key in old if key not in new]
    lines += [f"~ {key}=*** (changed)" for key in new if key in old and old[key] != new[key]]
    return lines


@step("Stack")
def converge(config: HostConfig, env: EnvPlan | None, snapshots: list[Snapshot], state: StackState,
          gpus: list[Gpu]) -> StackPlan | None:
    if env is None:
        return None  # the host failed its ML env check; it is reported there
    definition = StackDef.load(config.stack)
    try:
        tag = once(("tag", definition.name, env.base.id), lambda: image_tag(definition, env.base.id))
    except StackError as error:
        raise HostProblem(error) from None
    try:
        rendered = render(definition, config, env, snapshots, tag, gpus, control_secrets(config))
    except GpuRequestError as error:
        raise HostProblem(error) from None
    plan = plan_stack(state, rendered, tag, config.stack_profiles, definition)
    services = active_services(definition, config.stack_profiles)
    outcome = StackOutcome(definition.project, tag, {
        name: ServiceOutcome("keep") if name not in plan.recreate
        else ServiceOutcome("recreate" if name in state.containers else "create", plan.recreate[name])
        for name in services})
    report[host.name].stack = outcome
    if not (plan.send_image or plan.converge):
        healthy = sum(c.state == "running" and c.health in ("", "healthy") for c in state.containers.values())
        host.log(f"stack {definition.project}: no change "
                 f"({healthy}/{len(state.containers)} services running and healthy)")
        outcome.health = "healthy"  # a service that is not would be recreated
        return plan
    report[host.name].changed("stack")
    archive = Path(config.image_cache_dir).expanduser() / f"{tag.replace(':', '-')}.tar.gz"
    if plan.send_image:
        size = f"{archive.stat().st_size / 1e6:.1f} MB to send" if archive.exists() else "to build once, then send"
        host.log(f"stack {definition.project}: image {tag} ({size})")
    host.log(f"stack {definition.project}: "
             + (", ".join(f"{service} ({why})" for service, why in plan.recreate.items())
                or "files only, no service recreated"))
    if pyinfra_state.config.DIFF:
        for line in (_diff(state.compose, rendered.compose, "docker-compose.yml")
                     + masked_env_diff(state.digest, rendered.digest)):
            host.log(f"  {line}")
    if plan.send_image:
        ship_image(name=f"Image {tag}", stack=definition, tag=tag, base=env.base,
                   builder=config.ml_env_builder, archive=archive, compose_dir=config.compose_project_dir)
    if plan.push:
        push_compose(name=f"Compose project {definition.project}", project=definition.project,
                     compose_dir=config.compose_project_dir, rendered=rendered, profiles=config.stack_profiles)
    if plan.converge:
        checks = [url for name in services for url in definition.services[name].get("http_checks", [])]
        converge_stack(name=f"Up and healthy: {definition.project}", project=definition.project,
                       compose_dir=config.compose_project_dir, profiles=config.stack_profiles,
                       timeout=config.health_timeout, checks=checks, services=services)
    return plan
