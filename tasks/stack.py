"""The stack: the slim server image, the compose project built as data, pushed, validated on the
host, then brought up — recreating exactly the services whose config changed — behind a health gate.

The compose document is a dict dumped with PyYAML. Values the deploy injects (paths, model ids,
commits, settings) have `$` doubled so compose never interpolates them; what a stack author wrote
in `files/stacks/<name>/stack.yml` keeps compose's own syntax. Secrets live only in `.env` (0600),
written by `dotenv_line`; `.env.digest` (key → hash of value) lets later runs see what changed
without reading a secret back.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import io
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml
from pyinfra import host, logger, state as pyinfra_state
from pyinfra.api import FunctionCommand, StringCommand, deploy, operation
from pyinfra.api.command import FileUploadCommand
from pyinfra.api.exceptions import PyinfraError

from tasks.config import FILES, HostConfig
from tasks.facts import StackHostState
from tasks.gpu import Gpu, device_reservation
from tasks.hostops import RoomCheckedUpload, UploadProgress, once
from tasks.ml_env import EnvPlan
from tasks.ml_env_build import BaseImage, BuilderError, builder_engine, describe, require_base, tar_of
from tasks.models import Snapshot

STACKS = FILES / "stacks"
OUR_KEYS = ("mounts", "models", "http_checks")  # stack.yml keys the deploy consumes; the rest is compose's
HF_HOME = "/root/.cache/huggingface"


class StackError(PyinfraError):
    """The stack cannot be planned; the message names the host, the setting and what to do."""


@dataclass(frozen=True)
class StackDef:
    name: str
    project: str
    dockerfile: str
    context: str | None
    services: dict = field(hash=False)

    @property
    def repository(self) -> str:
        return f"mlstack-{self.name}"

    @classmethod
    @cache  # read once per deploy, however many hosts (render copies what it changes)
    def load(cls, name: str) -> StackDef:
        data = yaml.safe_load((STACKS / name / "stack.yml").read_text())
        return cls(name, data["project"], data["dockerfile"], data.get("context"), data["services"])

    @property
    def directory(self) -> Path:
        return STACKS / self.name

    def build_files(self) -> dict[str, bytes]:
        """The image's build context: the stack's files, plus the `context` directory's content at its root."""
        files = {path.name: path.read_bytes() for path in sorted(self.directory.iterdir())
                 if path.is_file() and path.name != "stack.yml"}
        if self.context:
            root = self.directory / self.context
            if not root.is_dir():
                raise StackError(f"stack {self.name!r} builds from {root}, which does not exist: see the comment "
                                 f"at the top of files/stacks/{self.name}/stack.yml")
            for path in sorted(root.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    files[str(path.relative_to(root))] = path.read_bytes()
        return files


def image_tag(stack: StackDef, base_id: str) -> str:
    """Named by content: the build context and the base image id. Same content, same tag, no rebuild."""
    digest = hashlib.sha256(base_id.encode())
    for name, data in stack.build_files().items():
        digest.update(f"\0{name}\0{len(data)}\0".encode() + data)
    return f"{stack.repository}:{digest.hexdigest()[:16]}"


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
            if gpus:
                service.setdefault("deploy", {}).setdefault("resources", {})["reservations"] = device_reservation(gpus)
        if "models" in spec.get("mounts", []):
            volumes.append({"type": "bind", "source": escape(config.model_cache_dir), "target": HF_HOME, "read_only": True})
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
    if old.get("mlstack.env-id") != new.get("mlstack.env-id"):
        return f"env id {old.get('mlstack.env-id') or 'none'} → {new.get('mlstack.env-id')}"
    if old.get("mlstack.models") != new.get("mlstack.models"):
        return f"model commit {old.get('mlstack.models') or 'none'} → {new.get('mlstack.models')}"
    if old.get("mlstack.image") != new.get("mlstack.image"):
        return f"image {old.get('mlstack.image') or 'none'} → {new.get('mlstack.image')}"
    return "config"


def plan_stack(state: StackHostState, rendered: Rendered, tag: str, profiles: list[str], stack: StackDef) -> StackPlan:
    recreate = {}
    for name, labels in rendered.labels.items():
        wanted_profiles = stack.services[name].get("profiles")
        if wanted_profiles and not set(wanted_profiles) & set(profiles):
            continue
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


def _build_and_save(stack: StackDef, tag: str, base: BaseImage, builder: str, archive: Path) -> Path:
    """Build the slim image on the builder once and keep `docker save | gzip` of it in the control cache."""
    if archive.exists():
        return archive
    buffer = io.BytesIO(tar_of(stack.build_files(), mode=0o644))
    with builder_engine(builder, f"building {tag} failed") as client:
        require_base(client, builder, base)
        print(f"image {tag}: building on {describe(builder)}", file=sys.stderr, flush=True)
        client.images.build(fileobj=buffer, custom_context=True, dockerfile=stack.dockerfile, tag=tag,
                            buildargs={"BASE_IMAGE": base.ref}, network_mode="none", rm=True)
        archive.parent.mkdir(parents=True, exist_ok=True)
        partial = archive.with_name(archive.name + ".partial")
        with gzip.open(partial, "wb", compresslevel=1) as out:
            for chunk in client.images.get(tag).save(named=True):
                out.write(chunk)
        partial.rename(archive)
    print(f"image {tag}: {archive.stat().st_size / 1e6:.1f} MB archive", file=sys.stderr, flush=True)
    return archive


def _image_ready(state, host, stack: StackDef, tag: str, base: BaseImage, builder: str, archive: Path) -> bool:
    try:
        once(("image", tag), lambda: _build_and_save(stack, tag, base, builder, archive))
    except (BuilderError, StackError) as error:
        host.log_styled(f"image {tag}: {error}", fg="red", log_func=logger.error)
        return False
    return True


@operation(is_idempotent=False)
def ship_image(stack: StackDef, tag: str, base: BaseImage, builder: str, archive: Path, compose_dir: str):
    """Build once for the fleet, then `docker load` on each host that lacks the tag."""
    yield FunctionCommand(_image_ready, (stack, tag, base, builder, archive), {})
    incoming = f"{compose_dir}/.image.tar.gz"
    yield RoomCheckedUpload(UploadProgress(archive, f"image {tag}"), incoming, remote_temp_filename=host.get_temp_filename(incoming))
    yield f"docker load -q -i {shlex.quote(incoming)} && rm -f {shlex.quote(incoming)}"


def compose_args(project: str, compose_dir: str, profiles: list[str], subdir: str = "") -> str:
    where = f"{compose_dir}/{subdir}" if subdir else compose_dir
    return (f"docker compose -p {shlex.quote(project)} --project-directory {shlex.quote(where)} "
            f"-f {shlex.quote(where + '/docker-compose.yml')}"
            + "".join(f" --profile {shlex.quote(profile)}" for profile in profiles))


def private_upload(data: bytes, dest: str):
    """Upload DATA so that it is never readable by others, also through sudo's temporary copy."""
    temp = host.get_temp_filename(dest)
    if (host.current_op_global_arguments or {}).get("_sudo"):  # sftp writes sudo's copy as the login user first
        yield StringCommand(f"umask 077 && : > {shlex.quote(temp)}", _sudo=False)
    yield f"install -m 0600 /dev/null {shlex.quote(dest)}"
    yield FileUploadCommand(io.BytesIO(data), dest, remote_temp_filename=temp)


@operation(is_idempotent=False)
def push_compose(project: str, compose_dir: str, rendered: Rendered, profiles: list[str]):
    """Validate the new project on the host (`docker compose config -q`) before it replaces the old one."""
    q, staged = shlex.quote, f"{compose_dir}/.next"
    yield f"rm -rf {q(staged)} && install -d -m 0700 {q(staged)}"
    yield from private_upload(rendered.compose.encode(), f"{staged}/docker-compose.yml")
    yield from private_upload(rendered.dotenv.encode(), f"{staged}/.env")
    yield from private_upload(rendered.digest.encode(), f"{staged}/.env.digest")
    yield f"{compose_args(project, compose_dir, profiles, '.next')} config -q"
    yield (f"cd {q(compose_dir)} && chmod 0640 .next/docker-compose.yml && mv -f .next/docker-compose.yml docker-compose.yml "
           "&& mv -f .next/.env .env && mv -f .next/.env.digest .env.digest && rmdir .next")


def health_gate_command(project: str, compose_dir: str, profiles: list[str], timeout: int, checks: list[str]) -> str:
    """`up -d --wait`, then each HTTP check; on failure: every service's state, and the failing ones' last log lines."""
    compose = compose_args(project, compose_dir, profiles)
    retries = max(1, timeout // 2)
    curl = " && ".join(f"curl -fsS -o /dev/null --max-time 5 --retry {retries} --retry-delay 2 --retry-all-errors {shlex.quote(url)}"
                       for url in checks) or "true"
    failing = (f"{compose} ps -a --format '{{{{.Service}}}} {{{{.State}}}} {{{{.Health}}}}' "
               "| awk '$2 != \"running\" || ($3 != \"\" && $3 != \"healthy\") {print $1}'")
    return (f"if {compose} up -d --wait --wait-timeout {timeout} --remove-orphans --quiet-pull && {{ {curl}; }}; then exit 0; fi; "
            f"echo 'stack {project}: not healthy within {timeout}s:' >&2; "
            f"{compose} ps -a --format '{{{{.Service}}}}: {{{{.State}}}} {{{{.Health}}}}' >&2; "
            f"for service in $({failing}); do echo \"last log lines of $service:\" >&2; "
            f"{compose} logs --no-color --no-log-prefix --tail 20 \"$service\" >&2; done; exit 1")


@operation(is_idempotent=False)
def converge_stack(project: str, compose_dir: str, profiles: list[str], timeout: int, checks: list[str]):
    """Compose recreates exactly the services whose config hash changed; then the health gate."""
    yield health_gate_command(project, compose_dir, profiles, timeout, checks)


def _diff(old: str | None, new: str, name: str) -> list[str]:
    return list(difflib.unified_diff((old or "").splitlines(), new.splitlines(), f"{name} (host)", f"{name} (new)", lineterm=""))


def masked_env_diff(old_digest: str | None, new_digest: str) -> list[str]:
    """Which .env keys are added, removed or changed; values are never shown."""
    old = dict(line.split("=", 1) for line in (old_digest or "").splitlines() if "=" in line)
    new = dict(line.split("=", 1) for line in new_digest.splitlines() if "=" in line)
    lines = [f"+ {key}=***" for key in new if key not in old]
    lines += [f"- {key}=***" for key in old if key not in new]
    lines += [f"~ {key}=*** (changed)" for key in new if key in old and old[key] != new[key]]
    return lines


@deploy("Stack")
def stack(config: HostConfig, env: EnvPlan | None, snapshots: list[Snapshot], state: StackHostState,
          gpus: list[Gpu]) -> StackPlan | None:
    if env is None:
        return None  # the host failed its ML env check; it is reported there
    definition = StackDef.load(config.stack)
    try:
        tag = once(("tag", definition.name, env.base.id), lambda: image_tag(definition, env.base.id))
    except StackError as error:
        raise StackError(f"{host.name}: {error}") from None
    rendered = render(definition, config, env, snapshots, tag, gpus, control_secrets(config))
    plan = plan_stack(state, rendered, tag, config.stack_profiles, definition)
    if not (plan.send_image or plan.converge):
        healthy = sum(c.state == "running" and c.health in ("", "healthy") for c in state.containers.values())
        host.log(f"stack {definition.project}: no change ({healthy}/{len(state.containers)} services running and healthy)")
        return plan
    archive = Path(config.image_cache_dir).expanduser() / f"{tag.replace(':', '-')}.tar.gz"
    if plan.send_image:
        size = f"{archive.stat().st_size / 1e6:.1f} MB to send" if archive.exists() else "to build once, then send"
        host.log(f"stack {definition.project}: image {tag} ({size})")
    host.log(f"stack {definition.project}: " + (", ".join(f"{service} ({why})" for service, why in plan.recreate.items())
                                                 or "files only, no service recreated"))
    if pyinfra_state.config.DIFF:
        for line in _diff(state.compose, rendered.compose, "docker-compose.yml") + masked_env_diff(state.digest, rendered.digest):
            host.log(f"  {line}")
    if plan.send_image:
        ship_image(name=f"Image {tag}", stack=definition, tag=tag, base=env.base,
                   builder=config.ml_env_builder, archive=archive, compose_dir=config.compose_project_dir)
    if plan.push:
        push_compose(name=f"Compose project {definition.project}", project=definition.project,
                     compose_dir=config.compose_project_dir, rendered=rendered, profiles=config.stack_profiles)
    if plan.converge:
        checks = [url for name, spec in definition.services.items() for url in spec.get("http_checks", [])
                  if not spec.get("profiles") or set(spec["profiles"]) & set(config.stack_profiles)]
        converge_stack(name=f"Up and healthy: {definition.project}", project=definition.project,
                       compose_dir=config.compose_project_dir, profiles=config.stack_profiles,
                       timeout=config.health_timeout, checks=checks)
    return plan
