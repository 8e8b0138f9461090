"""The ML env: built once per env id on the control side, installed on each host atomically,
checked by importing it in the runtime image, then switched to; older envs are kept for rollback.

On a host, below `ml_env_dir`:

    envs/<id>/           a complete user site (what the stack mounts read-only at /root/.local)
    envs/<id>.tmp-<mark>/       an unpack in progress: never mounted, removed by the next run
    incoming/<id>.tar.gz-<mark> an upload in progress (<mark>: the run's, tasks/host/transfer.py RUN_MARK)
    active -> envs/<id>  the env the stack uses: switched (rename) only after the import check passed

Decisions are made at plan time from this concern's part of the host probe (`MlEnvFact`) and the
env's manifest: an env id names what pip installed, so a recipe this control node never built is
built while planning (tasks/control/env_build.py), once for the whole fleet; a dry run changes no host.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, FunctionCommand, operation

from tasks.config import HostConfig
from tasks.control.builder import BaseImage, BuilderError
from tasks.control.env_artifact import ENV_INFO, ArtifactError, Manifest
from tasks.control.env_build import EnvSource, base_image, env_source
from tasks.control.stack_project import project_of
from tasks.host.failure import HostProblem, fail_host, failed, step
from tasks.host.gpu_checks import CudaEnv, gate_problems, smoke_devices
from tasks.host.gpus import GpuState
from tasks.host.probe import ProbePart
from tasks.host.programs import program
from tasks.host.transfer import MARKED, RUN_MARK, StreamedUpload, as_owner, room_problem
from tasks.report import EnvOutcome, report

MOUNT = "/root/.local"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DOCKER_GPU_FLAGS = {"runtime": "--gpus all", "cdi": "--device nvidia.com/gpu=all"}  # by GpuState.docker_gpus
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}


ENV_NAME = re.compile(rf"^(envs/(env-[0-9a-f]{{16}})(\.tmp{MARKED})?|incoming/(env-[0-9a-f]{{16}})\.tar\.gz{MARKED})$")


@dataclass(frozen=True)
class MlEnvState:
    active: str | None  # the env id `active` points at
    envs: dict[str, int]  # complete envs: id -> mtime (activation time)
    leftovers: tuple[str, ...]  # unfinished unpacks and uploads, relative to the env dir
    free_bytes: int  # on the file system that holds (or will hold) the env dir
    arch: str  # `uname -m`
    image_id: str | None  # the runtime base image's id on this host
    # (envs/<id>…, compose project or "") for every mount of one by a container on the host
    mounted: frozenset[tuple[str, str]] = frozenset()


class MlEnvFact(FactBase):
    """What the ML env dir holds, the room left for it, and the host's copy of the runtime base image.

    Only names this deploy writes are reported (`envs/env-<16 hex>[.tmp-<mark>]`, `incoming/<id>.tar.gz-<mark>`);
    anything else in the directory is not ours to judge or remove.
    """

    def command(self, env_dir: str, image: str) -> str:
        return program("ml_env_probe.sh", env_dir, image)

    def process(self, output: list[str]) -> MlEnvState:
        fields: dict[str, str] = {}
        envs: dict[str, int] = {}
        leftovers, mounted = [], set()
        for line in output:
            key, _, value = line.partition(" ")
            if key == "mounted":
                path, _, project = value.partition(" ")
                if ENV_NAME.match(path):
                    mounted.add((path, project))
                continue
            if key != "entry":
                fields.setdefault(key, value.strip())  # the first: the probe prints each field once
                continue
            mtime, _, name = value.partition(" ")
            match = ENV_NAME.match(name)
            if not match or not mtime.isdigit():
                continue  # not a name this deploy writes: not ours to judge or remove
            if match.group(2) and not match.group(3):
                envs[match.group(2)] = int(mtime)
            else:
                leftovers.append(name)
        active = ENV_NAME.match(fields.get("active", ""))
        image = fields.get("image", "")
        return MlEnvState(
            active=active.group(2) if active and not active.group(3) else None,
            envs=envs,
            leftovers=tuple(sorted(leftovers)),
            free_bytes=int(fields["free"]) * 1024 if fields.get("free", "").isdigit() else 0,
            arch=fields.get("arch", ""),
            image_id=image if re.fullmatch(r"sha256:[0-9a-f]{64}", image) else None,
            mounted=frozenset(mounted),
        )


def runtime_environment(python: str, mount: str = MOUNT) -> dict[str, str]:
    """What the stack's containers (and the import check) set so the env mounted at MOUNT is found."""
    return {"HOME": "/root", "PATH": f"{mount}/bin:{SYSTEM_PATH}", "PYTHONPATH": f"{mount}/lib/{python}/site-packages"}


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

    def summary(self, size: int) -> str:
        if self.upload:
            return f"ML env: {self.current or 'none'} → {self.wanted} ({size / 1e6:.1f} MB to upload)"
        if self.activate:
            return f"ML env: {self.current or 'none'} → {self.wanted} (on the host already)"
        return f"ML env: {self.wanted} (no change)"


def plan_env(state: MlEnvState, wanted: str, keep_envs: int, base: BaseImage, project: str) -> EnvPlan:
    """Upload if the host lacks a complete copy, switch if it is not active, keep KEEP_ENVS previous envs,
    and any env a container of another compose PROJECT (or none) mounts: the stack's own containers
    are switched to WANTED before the cleanup runs."""
    upload = wanted not in state.envs
    activate = upload or state.active != wanted
    others = sorted((env for env in state.envs if env != wanted), key=lambda env: -state.envs[env])
    if activate and state.active in others:  # the env we switch away from is the newest previous one
        others.remove(state.active)
        others.insert(0, state.active)
    in_use = {path for path, by in state.mounted if by != project}
    remove = tuple(path for path in (*(f"envs/{env}" for env in others[keep_envs:]), *state.leftovers)
                   if path not in in_use)
    return EnvPlan(wanted, state.active, upload, activate, remove, base)


def _ready_to_send(state, host, source: EnvSource, free_bytes: int) -> bool:
    """Check the artifact; refuse a host without room for it."""
    try:
        manifest = source.ensure()
    except ArtifactError as error:
        return failed(host, f"ML env {source.env}: {error}")
    problem = room_problem(free_bytes, manifest.size + manifest.unpacked_size, "artifact, unpacked env")
    return failed(host, f"ML env {source.env}: {problem}") if problem else True


def incoming_name(env: str) -> str:
    return f"incoming/{env}.tar.gz-{RUN_MARK}"


def unpack_command(env_dir: str, env: str, sha256: str) -> str:
    """Check the upload, unpack it under a temporary name, then make it complete by a rename (run as
    the env dir's owner, so what it unpacks is that user's)."""
    incoming, tmp, final = incoming_name(env), f"envs/{env}.tmp-{RUN_MARK}", f"envs/{env}"
    mismatch = f"ML env {env}: the uploaded artifact does not match its sha256; it was removed, run the deploy again"
    return " && ".join([
        f"cd {shlex.quote(env_dir)}",
        f"{{ echo '{sha256}  {incoming}' | sha256sum --check --quiet --strict - "
        f"|| {{ rm -f {incoming}; echo {shlex.quote(mismatch)} >&2; exit 1; }}; }}",
        f"rm -rf {tmp}",
        f"mkdir -m 0755 {tmp}",
        f"tar -xzf {incoming} -C {tmp} --no-same-owner",
        f"{{ mv -T {tmp} {final} || {{ [ -d {final} ] && rm -rf {tmp}; }}; }}",  # a run before ours finished it
        f"rm -f {incoming}",
    ])


@operation(is_idempotent=False)
def install_env(env_dir: str, source: EnvSource, owner: tuple[int, int], free_bytes: int):
    """Send the env artifact to a host that lacks it and unpack it atomically into envs/<id>."""
    # Runs at execution only: during change detection the generator stops at this first command.
    yield FunctionCommand(_ready_to_send, (source, free_bytes), {})
    manifest = source.ensure()
    quoted = shlex.quote(env_dir)
    yield as_owner(*owner, f"install -d -m 0700 {quoted}/incoming && install -d -m 0755 {quoted}/envs")
    yield StreamedUpload(source.artifact(), f"ML env {source.env}", f"{env_dir}/{incoming_name(source.env)}", owner,
                         then=unpack_command(env_dir, source.env, manifest.sha256))


def in_runtime_image(env_dir: str, env: str, image_id: str, python: str, command: str, options: str = "") -> str:
    """COMMAND run in the runtime image with envs/ENV mounted read-only where the stack mounts it."""
    environment = " ".join(f"-e {key}={shlex.quote(value)}" for key, value in runtime_environment(python).items())
    return (f"docker run --rm --network none {options}{' ' if options else ''}"
            f"-v {shlex.quote(f'{env_dir}/envs/{env}')}:{MOUNT}:ro {environment} --entrypoint '' {image_id} {command}")


def import_check_command(env_dir: str, env: str, image_id: str, python: str) -> str:
    return in_runtime_image(env_dir, env, image_id, python, program("import_check.py", MOUNT, ENV_INFO))


def cuda_env(manifest: Manifest) -> CudaEnv | None:
    """What the GPU gate checks an env against: its CUDA runtime (the runtime wheel's, else torch's) and
    torch's arch list; None for an env without CUDA."""
    runtime = manifest.cuda_runtime or manifest.torch.get("cuda") or ""
    return CudaEnv(runtime, tuple(manifest.torch.get("archs") or ())) if runtime else None


def gate_problem(gpus: GpuState, manifest: Manifest) -> str | None:
    """Why the plan-time checks of the GPU gate refuse MANIFEST's env on this host, or None."""
    problems = gate_problems(list(gpus.gpus), gpus.docker_gpus, cuda_env(manifest))
    if not problems:
        return None
    return f"GPU gate, {manifest.env_id}: " + "; ".join(problems) + " (the active env stays)"


def record_gate(host_name: str, manifest: Manifest, problem: str | None) -> str | None:
    """The outcome of the gate's plan-time checks in the host's report; returns PROBLEM."""
    cuda = cuda_env(manifest)
    report[host_name].gate = {"env": manifest.env_id, "cuda": cuda.major_minor if cuda else "",
                              "result": "refused" if problem else "checked", "problem": problem or ""}
    return problem


def smoke_command(env_dir: str, env: str, image_id: str, python: str, gpus: GpuState) -> str:
    """The GPU smoke test in the runtime image, with the env mounted and every GPU of the host given."""
    return in_runtime_image(env_dir, env, image_id, python, program("gpu_smoke.py", smoke_devices(list(gpus.gpus))),
                            DOCKER_GPU_FLAGS.get(gpus.docker_gpus, ""))


class EnvImportCheckFact(FactBase):
    """The import check of an installed env, run now: None when it passes, else what failed (read-only)."""

    def command(self, env_dir: str, env: str, image_id: str, python: str) -> str:
        return f"{import_check_command(env_dir, env, image_id, python)} 2>&1 >/dev/null | tail -5; true"

    def process(self, output: list[str]) -> str | None:
        return " / ".join(line.strip() for line in output if line.strip()) or None


@operation(is_idempotent=False)
def activate_env(env_dir: str, env: str, image_id: str, python: str, owner: tuple[int, int],
                 gpus: GpuState | None = None):
    """Import every requirement in the runtime image from the env; on a GPU host (GPUS) run the GPU smoke
    test too; only then point `active` at it."""
    yield import_check_command(env_dir, env, image_id, python)
    if gpus:
        yield smoke_command(env_dir, env, image_id, python, gpus)
    yield as_owner(*owner, f"cd {shlex.quote(env_dir)} && ln -sfn envs/{env} active.new && mv -T active.new active "
                           f"&& touch envs/{env}")


@operation(is_idempotent=False)
def remove_old_envs(env_dir: str, paths: tuple[str, ...], owner: tuple[int, int]):
    """Remove envs beyond `keep_envs` and unfinished uploads or unpacks."""
    yield as_owner(*owner, f"cd {shlex.quote(env_dir)} && rm -rf -- " + " ".join(shlex.quote(path) for path in paths))


def env_owner(config: HostConfig) -> tuple[int, int]:
    """Who works in the env dir: its owner, so that root never follows what that user plants there."""
    return config.ml_env_dir_uid, config.ml_env_dir_gid


def probe_part(config: HostConfig) -> ProbePart:
    return ProbePart("ml_env", MlEnvFact, {"env_dir": config.ml_env_dir, "image": config.ml_env_base_image})


def host_problem(config: HostConfig, state: MlEnvState, base: BaseImage) -> str | None:
    """Why this host cannot run envs built on BASE, or None."""
    image = config.ml_env_base_image
    if state.image_id is None:
        return (f"the runtime base image {image!r} is not on this host (the import check runs it): "
                "load or pull it there first")
    if state.image_id != base.id:
        return (f"the runtime base image {image!r} is {state.image_id[:19]} on this host but {base.id[:19]} "
                "on the builder: the env would be built for another image; make them the same")
    arch = ARCHES.get(state.arch, state.arch)
    if base.platform != f"linux/{arch}":
        return f"this host is linux/{arch}, the env is built for {base.platform}"
    return None


@step("ML env")
def converge(config: HostConfig, state: MlEnvState, gpus: GpuState) -> EnvPlan | None:
    """Install and switch to the wanted env, through the GPU gate on a GPU host; returns the plan (the stack
    mounts `envs/<plan.wanted>`)."""
    try:
        base = base_image(config, Path(config.ml_env_cache_dir).expanduser(), state.image_id)
        source = env_source(config, base)
        cached = source.cached()
    except (ArtifactError, BuilderError) as error:
        raise HostProblem(error) from None
    problem = host_problem(config, state, base)
    if problem:
        raise HostProblem(problem)
    plan = plan_env(state, source.env, config.keep_envs, base, project_of(config).name)
    if plan.upload and cached is None:
        raise HostProblem(f"ml_env_id = {source.env!r}: this env is neither on the host nor in the control cache "
                          f"{source.cache_dir}: pin an env id an earlier deploy installed, or unset ml_env_id")
    host.log(plan.summary(cached.size if cached else 0))
    record = report[host.name]
    gate = gpus if plan.activate and gpus.gpus else None
    if gate and cached is not None:  # the plan-time checks, before anything changes
        problem = record_gate(host.name, cached, gate_problem(gate, cached))
        if problem:
            raise HostProblem(problem)
    elif gate:  # a pinned env only on the host: nothing to check against but the host itself
        host.log(f"GPU gate, {source.env}: no manifest on the control node, so the smoke test alone decides")
    record.env = EnvOutcome(plan.current, plan.wanted,
                            "install" if plan.upload else "switch" if plan.activate else "none")
    if plan.activate or plan.remove:
        record.changed("ML env")
    if config.ml_env_check_active and not plan.activate:
        failure = host.get_fact(EnvImportCheckFact, env_dir=config.ml_env_dir, env=plan.wanted, image_id=base.id,
                                python=base.python)
        if failure:
            record.changed("ML env")
            fail_host("ML env", f"the active env {plan.wanted} fails its import check: {failure}")
    if plan.upload:
        install_env(
            name=f"Upload and unpack {source.env}",
            env_dir=config.ml_env_dir, source=source, owner=env_owner(config), free_bytes=state.free_bytes,
        )
    if plan.activate:
        activate_env(name=f"Import check, then switch to {source.env}",  # one name on every host: one operation
                     env_dir=config.ml_env_dir, env=source.env, image_id=base.id, python=base.python,
                     owner=env_owner(config), gpus=gate)
    return plan


@step("ML env cleanup")
def cleanup(config: HostConfig, plan: EnvPlan | None):
    """After the stack switched: remove envs beyond `keep_envs` and unfinished transfers."""
    if plan is not None and plan.remove:
        remove_old_envs(name=f"Remove {len(plan.remove)} old env(s) or unfinished transfer(s)",
                        env_dir=config.ml_env_dir, paths=plan.remove, owner=env_owner(config))
