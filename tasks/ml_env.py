"""The ML env: built once per env id on the control side, installed on each host atomically,
checked by importing it in the runtime image, then switched to; older envs are kept for rollback.

On a host, below `ml_env_dir`:

    envs/<id>/           a complete user site (what the stack mounts read-only at /root/.local)
    envs/<id>.tmp/       an unpack in progress: never mounted, removed by the next run
    incoming/<id>.tar.gz an upload in progress
    active -> envs/<id>  the env the stack uses: switched (rename) only after the import check passed

Decisions are made at plan time from one `MlEnvState` fact per host; a dry run builds and
changes nothing. The build itself runs at execution time, once per env id for the whole fleet.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import FactBase, FunctionCommand, deploy, operation
from pyinfra.api.exceptions import PyinfraError

from tasks.config import HostConfig, read_requirements
from tasks.facts import MlEnvHostState
from tasks.hostops import RoomCheckedUpload, UploadProgress, once, refuse, room_problem
from tasks.ml_env_artifact import ENV_INFO, ArtifactError, Manifest, check_artifact, env_id
from tasks.ml_env_build import (BaseImage, artifact_paths, build_env, builder_engine, cached_manifest, known_base_image,
                                probe_base_image, require_base)

MOUNT = "/root/.local"
RUNTIME_PATH = f"{MOUNT}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}

# Runs inside the runtime image with the env mounted: every top-level requirement must import, from the env.
IMPORT_CHECK = f"""
import importlib, json, sys
info = json.load(open("{MOUNT}/{ENV_INFO}"))
have = "python%d.%d" % sys.version_info[:2]
if info["python"] != have:
    sys.exit("ML env %s is built for %s, the runtime image runs %s" % (info["env_id"], info["python"], have))
failed = []
for dist, names in sorted(info["imports"].items()):
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as error:
            failed.append("%s (from %s): %s: %s" % (name, dist, type(error).__name__, error))
            continue
        where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "a built-in")
        if not where.startswith("{MOUNT}/"):
            failed.append("%s (from %s) was imported from %s, not from the env" % (name, dist, where))
if failed:
    sys.exit("ML env %s does not import in the runtime image:\\n  %s" % (info["env_id"], "\\n  ".join(failed)))
print("ML env %s: %d packages import" % (info["env_id"], len(info["imports"])))
"""


class MlEnvError(PyinfraError):
    """The ML env cannot be planned for a host; the message names the host, setting and value."""


def runtime_environment(python: str) -> dict[str, str]:
    """What the stack's containers (and the import check) set so the mounted user site is found."""
    return {"HOME": "/root", "PATH": RUNTIME_PATH, "PYTHONPATH": f"{MOUNT}/lib/{python}/site-packages"}


@dataclass(frozen=True)
class EnvPlan:
    """What one host needs: the result of comparing its `MlEnvState` with the wanted env."""

    wanted: str
    current: str | None
    upload: bool
    activate: bool
    remove: tuple[str, ...]  # paths relative to the env dir, removed once the stack uses `wanted`
    base: BaseImage  # the runtime image the env is checked in (and the stack runs)

    def environment(self) -> dict[str, str]:
        return runtime_environment(self.base.python)

    def summary(self, size: int | None) -> str:
        if self.upload:
            what = "to build once, then upload" if size is None else f"{size / 1e6:.1f} MB to upload"
            return f"ML env: {self.current or 'none'} → {self.wanted} ({what})"
        if self.activate:
            return f"ML env: {self.current or 'none'} → {self.wanted} (on the host already)"
        return f"ML env: {self.wanted} (no change)"


def plan_env(state: MlEnvHostState, wanted: str, keep_envs: int, base: BaseImage) -> EnvPlan:
    """Upload if the host lacks a complete copy, switch if it is not active, keep KEEP_ENVS previous envs."""
    upload = wanted not in state.envs
    activate = upload or state.active != wanted
    others = sorted((env for env in state.envs if env != wanted), key=lambda env: -state.envs[env])
    if activate and state.active in others:  # the env we switch away from is the newest previous one
        others.remove(state.active)
        others.insert(0, state.active)
    remove = tuple(f"envs/{env}" for env in others[keep_envs:]) + state.leftovers
    return EnvPlan(wanted, state.active, upload, activate, remove, base)


@dataclass(frozen=True)
class EnvSource:
    """Where the wanted env's artifact comes from: the control cache, built first if a recipe is given."""

    env: str
    cache_dir: Path
    builder: str = ""
    base: BaseImage | None = None
    requirements: str = ""  # a path on the control node
    pip_options: tuple = field(default=(), repr=False)  # (key, value) pairs, `${VAR}` references unexpanded

    def cached(self) -> Manifest | None:
        return cached_manifest(self.cache_dir, self.env)

    def artifact(self) -> Path:
        return artifact_paths(self.cache_dir, self.env)[0]

    def ensure(self) -> Manifest:
        """The artifact's manifest, built first if needed; a cached artifact is checked before it is sent."""
        return once(("artifact", self.env, self.cache_dir), self._make)

    def _make(self) -> Manifest:
        cached = self.cached()
        if cached is not None:
            check_artifact(self.artifact(), cached)
            return cached
        if self.base is None:
            raise ArtifactError(f"env {self.env} is in neither the host nor the control cache {self.cache_dir}")
        with builder_engine(self.builder, "the build failed") as client:
            require_base(client, self.builder, self.base)
            manifest = build_env(client, self.env, self.base.ref, read_requirements(self.requirements),
                                 dict(self.pip_options), self.cache_dir, log=sys.stderr)
        if manifest.python != self.base.python:
            raise ArtifactError(f"env {self.env} has site-packages for {manifest.python}, "
                                f"but {self.base.ref} runs {self.base.python}")
        return manifest


def base_image(config: HostConfig, cache_dir: Path, host_image: str | None) -> BaseImage:
    """The runtime image envs are built for and checked in. When the host runs an image an earlier probe
    recorded (an image id names its content) that record is enough, so a deploy with nothing to build
    never contacts the builder; otherwise the builder is asked, once per fleet."""
    known = known_base_image(config.ml_env_base_image, host_image, cache_dir) if host_image else None
    if known is not None:
        return known

    def probe() -> BaseImage:
        with builder_engine(config.ml_env_builder, f"cannot run {config.ml_env_base_image!r}") as client:
            return probe_base_image(client, config.ml_env_builder, config.ml_env_base_image, cache_dir)

    return once(("base", config.ml_env_builder, config.ml_env_base_image, cache_dir), probe)


def env_source(config: HostConfig, base: BaseImage) -> EnvSource:
    """The env this host should run: the pinned `ml_env_id`, or the one `ml_env_requirements` make on BASE."""
    cache_dir = Path(config.ml_env_cache_dir).expanduser()
    if config.ml_env_id:
        return EnvSource(config.ml_env_id, cache_dir, base=None)
    pip_options = config.pip_options()
    wanted = env_id(read_requirements(config.ml_env_requirements), base.id, base.platform, pip_options)
    return EnvSource(wanted, cache_dir, config.ml_env_builder, base, config.ml_env_requirements,
                     tuple((key, tuple(value) if isinstance(value, list) else value) for key, value in pip_options.items()))


def _ready_to_send(state, host, source: EnvSource, free_bytes: int) -> bool:
    """Build (once per fleet) or check the artifact, and refuse a host without room for it."""
    try:
        manifest = source.ensure()
    except ArtifactError as error:
        host.log_styled(f"ML env {source.env}: {error}", fg="red", log_func=logger.error)
        return False
    problem = room_problem(free_bytes, manifest.size + manifest.unpacked_size, "artifact, unpacked env")
    if problem:
        host.log_styled(f"ML env {source.env}: {problem}", fg="red", log_func=logger.error)
        return False
    return True


def unpack_command(env_dir: str, env: str, sha256: str, uid: int, gid: int) -> str:
    """Check the upload, unpack it under a temporary name, own it, then make it complete by a rename."""
    incoming, tmp, final = f"incoming/{env}.tar.gz", f"envs/{env}.tmp", f"envs/{env}"
    mismatch = f"ML env {env}: the uploaded artifact does not match its sha256; it was removed, run the deploy again"
    return " && ".join([
        f"cd {shlex.quote(env_dir)}",
        f"{{ echo '{sha256}  {incoming}' | sha256sum --check --quiet --strict - "
        f"|| {{ rm -f {incoming}; echo {shlex.quote(mismatch)} >&2; exit 1; }}; }}",
        f"rm -rf {tmp}",
        f"mkdir -m 0755 {tmp}",
        f"tar -xzf {incoming} -C {tmp} --no-same-owner",
        f"chown -R {uid}:{gid} {tmp}",
        f"mv -T {tmp} {final}",
        f"rm -f {incoming}",
    ])


@operation(is_idempotent=False)
def install_env(env_dir: str, source: EnvSource, uid: int, gid: int, free_bytes: int):
    """Send the env artifact to a host that lacks it and unpack it atomically into envs/<id>."""
    # Runs at execution only: during change detection the generator stops at this first command.
    yield FunctionCommand(_ready_to_send, (source, free_bytes), {})
    manifest = source.ensure()
    incoming = f"{env_dir}/incoming/{source.env}.tar.gz"
    yield (f"install -d -m 0700 {shlex.quote(env_dir)}/incoming && "
           f"install -d -m 0755 -o {uid} -g {gid} {shlex.quote(env_dir)}/envs")
    yield RoomCheckedUpload(UploadProgress(source.artifact(), f"ML env {source.env}"), incoming,
                            remote_temp_filename=host.get_temp_filename(incoming))
    yield unpack_command(env_dir, source.env, manifest.sha256, uid, gid)


def import_check_command(env_dir: str, env: str, image_id: str, python: str) -> str:
    environment = " ".join(f"-e {key}={shlex.quote(value)}" for key, value in runtime_environment(python).items())
    return (f"docker run --rm --network none -v {shlex.quote(f'{env_dir}/envs/{env}')}:{MOUNT}:ro {environment} "
            f"--entrypoint python3 {image_id} -c {shlex.quote(IMPORT_CHECK)}")


class EnvImportCheck(FactBase):
    """The import check of an installed env, run now: None when it passes, else what failed (read-only)."""

    def command(self, env_dir: str, env: str, image_id: str, python: str) -> str:
        return f"{import_check_command(env_dir, env, image_id, python)} 2>&1 >/dev/null | tail -5; true"

    def process(self, output: list[str]) -> str | None:
        return " / ".join(line.strip() for line in output if line.strip()) or None


@operation(is_idempotent=False)
def activate_env(env_dir: str, env: str, image_id: str, python: str):
    """Import every requirement in the runtime image from the env; only then point `active` at it."""
    yield import_check_command(env_dir, env, image_id, python)
    yield (f"cd {shlex.quote(env_dir)} && ln -sfn envs/{env} active.new && mv -T active.new active "
           f"&& touch envs/{env}")


@operation(is_idempotent=False)
def remove_old_envs(env_dir: str, paths: tuple[str, ...]):
    """Remove envs beyond `keep_envs` and unfinished uploads or unpacks."""
    yield f"cd {shlex.quote(env_dir)} && rm -rf -- " + " ".join(shlex.quote(path) for path in paths)


def host_problem(config: HostConfig, state: MlEnvHostState, base: BaseImage) -> str | None:
    """Why this host cannot run envs built on BASE, or None."""
    image = config.ml_env_base_image
    if state.image_id is None:
        return (f"ML env: the runtime base image {image!r} is not on this host (the import check runs it): "
                "load or pull it there first")
    if state.image_id != base.id:
        return (f"ML env: the runtime base image {image!r} is {state.image_id[:19]} on this host but {base.id[:19]} "
                "on the builder: the env would be built for another image; make them the same")
    arch = ARCHES.get(state.arch, state.arch)
    if base.platform != f"linux/{arch}":
        return f"ML env: this host is linux/{arch}, the env is built for {base.platform}"
    return None


@deploy("ML env")
def ml_env(config: HostConfig, state: MlEnvHostState) -> EnvPlan | None:
    """Install and switch to the wanted env; returns the plan (the stack mounts `envs/<plan.wanted>`)."""
    try:
        base = base_image(config, Path(config.ml_env_cache_dir).expanduser(), state.image_id)
        source = env_source(config, base)
        cached = source.cached()
    except ArtifactError as error:
        raise MlEnvError(f"{host.name}: {error}") from None
    problem = host_problem(config, state, base)
    if problem:
        host.log(problem)
        refuse(name="Host check", message=f"{host.name}: {problem}")
        return None
    plan = plan_env(state, source.env, config.keep_envs, base)
    if plan.upload and source.base is None and cached is None:
        raise MlEnvError(f"{host.name}: ml_env_id = {source.env!r}: this env is neither on the host nor in the "
                         f"control cache {source.cache_dir}: pin an env id an earlier deploy installed, or unset ml_env_id")
    host.log(plan.summary(cached.size if cached else None))
    if config.ml_env_check_active and not plan.activate:
        failure = host.get_fact(EnvImportCheck, env_dir=config.ml_env_dir, env=plan.wanted, image_id=base.id,
                                python=base.python)
        if failure:
            host.log(f"ML env: the active env {plan.wanted} fails its import check: {failure}")
            refuse(name=f"Import check of the active env {plan.wanted}", message=f"{host.name}: {failure}")
    if plan.upload:
        install_env(
            name=f"Upload and unpack {source.env}",
            env_dir=config.ml_env_dir, source=source, uid=config.ml_env_dir_uid, gid=config.ml_env_dir_gid,
            free_bytes=state.free_bytes,
        )
    if plan.activate:
        activate_env(name=f"Import check, then switch to {source.env}",
                     env_dir=config.ml_env_dir, env=source.env, image_id=base.id, python=base.python)
    return plan


@deploy("ML env cleanup")
def ml_env_cleanup(config: HostConfig, plan: EnvPlan | None):
    """After the stack switched: remove envs beyond `keep_envs` and unfinished transfers."""
    if plan is not None and plan.remove:
        remove_old_envs(name=f"Remove {len(plan.remove)} old env(s) or unfinished transfer(s)",
                        env_dir=config.ml_env_dir, paths=plan.remove)
