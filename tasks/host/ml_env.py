"""The ML env: built once per env id on the control side, installed on each host atomically,
checked by importing it in the runtime image, then switched to; older envs are kept for rollback.

On a host, below `ml_env_dir`, the env store (files/host/env_store.sh):

    objects/<sha256>-<mode>  every file of every env, once (owner and mode as the env dir's owner's)
    envs/<id>/               a complete user site, a tree of hard links into objects/ (what the stack
                             mounts read-only at /root/.local)
    envs/<id>.tmp-<mark>/    a tree in the making, from the env's manifest alone (never a copy of another
                             env's tree); never mounted, removed by the next run
    incoming/<mark>/         the objects of a transfer in progress, each checked against its name before
                             it enters objects/ (<mark>: the run's, tasks/host/transfer.py RUN_MARK)
    active -> envs/<id>      the env the stack uses: switched (rename) only after the import check passed

Only the objects the host lacks travel (tasks/control/env_store.py); an object no kept env links to any
more (a link count of 1) is removed with the env that last used it.

Decisions are made at plan time from this concern's part of the host probe (`MlEnvFact`) and the
env's manifest: an env id names what pip installed, so a recipe this control node never built is
built while planning (tasks/control/env_build.py), once for the whole fleet; a dry run changes no host.
A host needs an env only when a service of `ml_services` mounts it (or it downloads models with it); otherwise
this concern builds, sends and checks nothing (`NoEnv`).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pyinfra import host
from pyinfra.api import FactBase, StringCommand, operation

from ..config import HostConfig
from ..control.builder import BaseImage, BuilderError
from ..control.env_artifact import ENV_INFO, ArtifactError, Manifest
from ..control.env_store import (
    OBJECT,
    Listing,
    Transfer,
    Tree,
    check_objects,
    env_tree,
    host_tree,
    objects_tar,
    plan_transfer,
    read_tree,
    transfer_stream,
    tree_drift,
    tree_objects,
)
from ..report import EnvOutcome, report
from . import fanout
from .failure import HostProblem, fail_host, failed, step
from .fanout import PeerRun, Swarm
from .gpu_checks import CudaEnv, gate_problems, smoke_devices
from .gpus import GpuState
from .probe import ProbePart, carried, received
from .programs import program
from .transfer import MARKED, RUN_MARK, StreamedUpload, as_owner, room_problem

if TYPE_CHECKING:
    from ..control.env_build import EnvSource
    from ..control.fleet_context import FleetContext

MOUNT = "/root/.local"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DOCKER_GPU_FLAGS = {"runtime": "--gpus all", "cdi": "--device nvidia.com/gpu=all"}  # by GpuState.docker_gpus
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}


# envs, trees in the making, transfers in progress (and the tarballs of versions before the store)
ENV_NAME = re.compile(rf"^(envs/(env-[0-9a-f]{{16}})(\.tmp{MARKED})?|incoming/(env-[0-9a-f]{{16}})\.tar\.gz{MARKED}"
                      r"|incoming/[0-9a-f]{8})$")


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
    stored: frozenset[str] = frozenset()  # the complete envs the store made (trees of links into objects/)
    damaged: tuple[str, ...] = ()  # objects whose content differs from their name (when hashed)
    swapped: tuple[str, ...] = ()  # env ids whose envs/<id> is a link, not a tree of the store
    trees: dict[str, Listing] = field(default_factory=dict)  # each env's tree as listed (when hashed)


class MlEnvFact(FactBase):
    """What the ML env dir holds, the room left for it, and the host's copy of the runtime base image.

    Only names this deploy writes are reported (`envs/env-<16 hex>[.tmp-<mark>]`, `incoming/<id>.tar.gz-<mark>`);
    anything else in the directory is not ours to judge or remove.
    """

    def command(self, env_dir: str, image: str, hash_as: tuple[int, int] | None = None) -> str:
        return program("ml_env_probe.sh", env_dir, image, "%d:%d" % hash_as if hash_as else "")

    def process(self, output: list[str]) -> MlEnvState:
        fields: dict[str, str] = {}
        envs: dict[str, int] = {}
        leftovers, mounted, stored, damaged = [], set(), set(), []
        swapped: list[str] = []
        trees: dict[str, Listing] = {}
        for line in output:
            key, _, value = line.partition(" ")
            if key in ("tree", "odd", "swapped"):
                _store_line(key, value, trees, swapped)
                continue
            if key == "mounted":
                path, _, project = value.partition(" ")
                if ENV_NAME.match(path):
                    mounted.add((path, project))
                continue
            if key == "stored":
                stored.add(value.removeprefix("envs/"))
                continue
            if key == "damaged":
                damaged += [value] if OBJECT.fullmatch(value) else []
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
            stored=frozenset(stored & set(envs)),
            damaged=tuple(sorted(set(damaged))),
            swapped=tuple(sorted(set(swapped))),
            trees=trees,
        )


ODD = "(a name or link target holding a newline or tab)"  # one path for all such entries of a tree


def _store_line(key: str, value: str, trees: dict[str, Listing], swapped: list[str]) -> None:
    """A probe line about the store's trees: an entry (`tree`), an entry that cannot be listed (`odd`), an env
    swapped for a link (`swapped`); lines of other envs than ours are ignored."""
    if key == "swapped":
        match = ENV_NAME.match(value)
        swapped += [match.group(2)] if match and match.group(2) and not match.group(3) else []
        return
    env, _, rest = value.partition("\t")
    if not re.fullmatch(r"env-[0-9a-f]{16}", env):
        return
    if key == "odd":
        trees.setdefault(env, {})[ODD] = ("?", "")
        return
    kind, path, ref = (rest.split("\t", 2) + ["", ""])[:3]
    trees.setdefault(env, {})[path] = (kind, ref)


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


@dataclass(frozen=True)
class NoEnv:
    """No env is wanted (`env_wanted`): nothing is built, sent, checked or mounted on this host. A host that
    failed its env step gives None instead, so the steps after this one can tell the two apart."""

    host_image: str | None  # the runtime base image's id on this host, if it holds it (for the stack's builds)
    summary = "ML env: not used by any service (ml_services): nothing built, sent or checked"


def env_wanted(config: HostConfig) -> bool:
    """Whether this host needs the env: a service of `ml_services` mounts it, or the host downloads models with it
    (`model_mode` "host" runs huggingface_hub from the env)."""
    return (any(uses.ml_env for uses in config.ml_services.values())
            or config.model_mode == "host" and bool(config.models))


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
    swapped = (f"envs/{env}" for env in state.swapped if env != wanted)  # the wanted one: replaced by its upload
    remove = tuple(path for path in (*(f"envs/{env}" for env in others[keep_envs:]), *state.leftovers, *swapped)
                   if path not in in_use)
    return EnvPlan(wanted, state.active, upload, activate, remove, base)


def held_trees(cache_dir: Path, state: MlEnvState) -> dict[str, Tree]:
    """The trees of the envs the host's store holds, as far as this control node knows them."""
    return {env: tree for env in sorted(state.stored) if (tree := read_tree(cache_dir, env)) is not None}


def planned_transfer(source: EnvSource, state: MlEnvState) -> Transfer:
    """What the host will be sent for SOURCE's env, as far as the control node knows the host's store (the
    trees of the envs it holds): checked artifact, tree unpacked into the control store, room on the host."""
    try:
        source.ensure()
        tree = env_tree(source.cache_dir, source.env, source.artifact())
    except ArtifactError as error:
        raise HostProblem(f"ML env {source.env}: {error}") from None
    held = held_trees(source.cache_dir, state)
    transfer = plan_transfer(tree, set().union(*map(tree_objects, held.values())))
    problem = room_problem(state.free_bytes, transfer.object_bytes, "the env's new files")
    if problem:
        raise HostProblem(f"ML env {source.env}: {problem}")
    return transfer


class EnvUpload(StreamedUpload):
    """The env SOURCE made on the host from its manifest, or (HELD: the host's tree of it, as `host_tree` reads
    it) mended into it in place; sent only the objects the host's store lacks (asked of the host now, as it may
    have lost some or gained them from another control node), checked on the control node before a byte
    leaves."""

    def __init__(self, source: EnvSource, env_dir: str, owner: tuple[int, int], held: Tree | None = None,
                 fan: tuple[Swarm, PeerRun] | None = None):
        super().__init__(b"", f"ML env {source.env}", f"{env_dir}/envs/{source.env}", owner)
        self.env_source, self.env_dir, self.owner, self.held, self.fan = source, env_dir, owner, held, fan

    def __repr__(self):
        return f"EnvUpload({self.env_source.env}, {'mend' if self.held is not None else 'new'})"

    def execute(self, state, host, connector_arguments) -> bool:
        """The direct path; with a fan-out (tasks/host/fanout.py), a leecher first fetches from its peers what
        its store lacks, and the seed serves them once it holds the env."""
        def needs() -> dict[str, int]:
            present = self._present(state, host, connector_arguments)
            return self._needs(present) if isinstance(present, set) else {}

        return fanout.take_part(state, host, connector_arguments, self.fan, needs=needs, direct=lambda _: self._direct(
            state, host, connector_arguments, self._present(state, host, connector_arguments)))

    def _present(self, state, host, connector_arguments) -> set[str] | str:
        """The objects the host's store holds, or why it could not be listed."""
        listing = as_owner(*self.owner, program("env_store.sh", "list", self.env_dir))
        listed, output = host.run_shell_command(StringCommand(carried(listing)), **connector_arguments)
        try:  # every name comes back whole (one that is not UTF-8 as \xNN), never cut off at it
            names = received(output.stdout_lines) if listed else []
        except ValueError as error:
            listed, names = False, [str(error)]
        if not listed:
            return " ".join((names or output.stderr_lines)[-1:])
        return {line for line in names if OBJECT.fullmatch(line)}

    def _needs(self, present: set[str]) -> dict[str, int]:
        """The objects (name -> size) the host lacks of the env."""
        tree = env_tree(self.env_source.cache_dir, self.env_source.env, self.env_source.artifact())
        return dict(plan_transfer(tree, present, self.held).send)

    def _direct(self, state, host, connector_arguments, present: set[str] | str) -> bool:
        """Send the host what its store lacks (PRESENT: what it holds), and the env's entries."""
        if isinstance(present, str):
            return failed(host, f"{self.label}: the host's env store could not be listed ({present}); "
                                "nothing was sent")
        cache_dir, env, mend = self.env_source.cache_dir, self.env_source.env, self.held is not None
        transfer = plan_transfer(env_tree(cache_dir, env, self.env_source.artifact()), present, self.held)
        try:
            check_objects(cache_dir, [name for name, _ in transfer.send])
        except ArtifactError as error:
            return failed(host, f"{self.label}: {error}; nothing was sent")
        self.source, sizes = transfer_stream(transfer, f"envs/{env}" if mend else f"envs/{env}.tmp-{RUN_MARK}",
                                             cache_dir)
        host.log(f"{self.label}: {len(transfer.send)} new file(s), {transfer.object_bytes / 1e6:.1f} MB, and "
                 f"{len(transfer.add)} entries" + (f", {len(transfer.remove)} removed (mended)" if mend else ""))
        self.receive = as_owner(*self.owner, program("env_store.sh", "mend" if mend else "receive", self.env_dir,
                                                     env, RUN_MARK, *sizes))
        return super().execute(state, host, connector_arguments)


@operation(is_idempotent=False)
def install_env(env_dir: str, source: EnvSource, owner: tuple[int, int], held: Tree | None = None,
                fan: tuple[Swarm, PeerRun] | None = None):
    """Make the env on a host that lacks it, or mend the host's tree HELD of it: only what its store lacks is
    sent (`EnvUpload`), through the fan-out FAN where there is one."""
    quoted = shlex.quote(env_dir)
    yield as_owner(*owner, f"install -d -m 0700 {quoted}/incoming && install -d -m 0755 {quoted}/envs {quoted}/objects")
    yield EnvUpload(source, env_dir, owner, held, fan)


def repairable(fleet: FleetContext, cache_dir: Path, state: MlEnvState) -> tuple[tuple[str, int], ...]:
    """The host's damaged objects with their sizes, each with a good copy in the control store (from the trees of
    the envs the host holds, unpacked from their artifacts if need be); a HostProblem for one without."""
    sizes: dict[str, int] = {}
    for env in sorted(state.stored):
        source = fleet.stored_env(env, cache_dir)
        if fleet.manifest(source) is not None:
            try:
                source.ensure()
                sizes.update(tree_objects(env_tree(cache_dir, env, source.artifact())))
            except ArtifactError as error:
                raise HostProblem(f"ML env {env}: {error}") from None
    unknown = [name for name in state.damaged if name not in sizes]
    if unknown:
        raise HostProblem(f"{len(unknown)} damaged object(s) of the env store ({unknown[0]}…) belong to no env this "
                          "control node holds: deploy from the control node that built them, or remove the envs "
                          "that use them")
    try:
        check_objects(cache_dir, list(state.damaged))
    except ArtifactError as error:
        raise HostProblem(f"ML env store: {error}") from None
    return tuple((name, sizes[name]) for name in state.damaged)


@operation(is_idempotent=False)
def repair_objects(env_dir: str, cache_dir: Path, damaged: tuple[tuple[str, int], ...], owner: tuple[int, int]):
    """Send a good copy of each DAMAGED object and link it at every path of the damaged one."""
    stream = objects_tar(cache_dir, damaged)
    yield StreamedUpload(stream, "ML env store repair", f"{env_dir}/objects/repair", owner,
                         receiver=program("env_store.sh", "repair", env_dir, RUN_MARK))


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
        return carried(f"{import_check_command(env_dir, env, image_id, python)} 2>&1 >/dev/null | tail -5; true")

    def process(self, output: list[str]) -> str | None:
        try:
            lines = received(output)
        except ValueError as error:
            return str(error)
        return " / ".join(line.strip() for line in lines if line.strip()) or None


@operation(is_idempotent=False)
def activate_env(env_dir: str, env: str, image_id: str, python: str, owner: tuple[int, int],
                 gpus: GpuState | None = None):
    """Import every requirement in the runtime image from the env; on a GPU host (GPUS) run the GPU smoke
    test too; only then point `active` at it."""
    yield import_check_command(env_dir, env, image_id, python)
    if gpus:
        yield smoke_command(env_dir, env, image_id, python, gpus)
    yield as_owner(*owner, switch_active_command(env_dir, env))


def switch_active_command(env_dir: str, env: str) -> str:
    """Point `active` at ENV by one rename; its mtime says when (the order in which envs are kept)."""
    return f"cd {shlex.quote(env_dir)} && ln -sfn envs/{env} active.new && mv -T active.new active && touch envs/{env}"


@operation(is_idempotent=False)
def remove_old_envs(env_dir: str, paths: tuple[str, ...], owner: tuple[int, int]):
    """Remove envs beyond `keep_envs` and unfinished transfers, then the objects no env left links to."""
    yield as_owner(*owner, f"cd {shlex.quote(env_dir)} && rm -rf -- " + " ".join(shlex.quote(path) for path in paths))
    yield as_owner(*owner, program("env_store.sh", "collect", env_dir))


def env_owner(config: HostConfig) -> tuple[int, int]:
    """Who works in the env dir: its owner, so that root never follows what that user plants there."""
    return config.ml_env_dir_uid, config.ml_env_dir_gid


def probe_part(config: HostConfig) -> ProbePart:
    hash_as = env_owner(config) if config.ml_env_verify_hashes and env_wanted(config) else None
    return ProbePart("ml_env", MlEnvFact, {"env_dir": config.ml_env_dir, "image": config.ml_env_base_image,
                                           "hash_as": hash_as})


def host_problem(config: HostConfig, state: MlEnvState, base: BaseImage) -> str | None:
    """Why this host cannot run envs built on BASE, or None. (A host that lacks BASE, or holds another id under
    its tag, gets it: tasks/host/runtime_image.py.)"""
    arch = ARCHES.get(state.arch, state.arch)
    if base.platform != f"linux/{arch}":
        return f"this host is linux/{arch}, the env is built for {base.platform}"
    return None


@step("ML env")
def converge(config: HostConfig, fleet: FleetContext, state: MlEnvState, base: BaseImage | None, gpus: GpuState
             ) -> EnvPlan | NoEnv | None:
    """Install and switch to the wanted env, built on BASE (on the host by now: tasks/host/runtime_image.py),
    through the GPU gate on a GPU host; returns the plan (the stack mounts `envs/<plan.wanted>`), or `NoEnv` when
    no env is wanted."""
    if not env_wanted(config):
        host.log(NoEnv.summary)
        return NoEnv(state.image_id)
    if base is None:
        return None  # the host failed at its runtime base image; it is reported there
    try:
        source = fleet.env(config, base)
        cached = fleet.manifest(source)
    except (ArtifactError, BuilderError) as error:
        raise HostProblem(error) from None
    plan = plan_env(state, source.env, config.keep_envs, base, fleet.project(config).name)
    if plan.upload and cached is None:
        raise HostProblem(f"ml_env_id = {source.env!r}: this env is neither on the host nor in the control cache "
                          f"{source.cache_dir}: pin an env id an earlier deploy installed, or unset ml_env_id")
    transfer = planned_transfer(source, state) if plan.upload else None
    host.log(plan.summary(transfer.object_bytes if transfer else 0))
    record = report[host.name]
    gate = plan_gate(gpus, plan, source, cached)
    record.env = EnvOutcome(plan.current, plan.wanted,
                            "install" if plan.upload else "switch" if plan.activate else "none")
    if plan.activate or plan.remove:
        record.changed("ML env")
    recheck = check_active_env(config, state, base, plan)
    mend_store(config, fleet, state, source.cache_dir, plan)
    if transfer is not None:
        install_env(name=f"Upload and unpack {source.env}", env_dir=config.ml_env_dir, source=source,
                    owner=env_owner(config), fan=fan_out(config, source, base, transfer))
    if plan.activate or recheck:
        activate_env(name=f"Import check, then switch to {source.env}",  # one name on every host: one operation
                     env_dir=config.ml_env_dir, env=source.env, image_id=base.id, python=base.python,
                     owner=env_owner(config), gpus=gate)
    return plan


def fan_out(config: HostConfig, source: EnvSource, base: BaseImage, transfer: Transfer
            ) -> tuple[Swarm, PeerRun] | None:
    """This host's part in the env's fan-out, or None: the direct path."""
    swarm = fanout.joined(config, "ML env", source.env, source.cache_dir / "objects", base, transfer.object_bytes)
    if swarm is None:
        return None
    adopt = as_owner(*env_owner(config), program("env_store.sh", "adopt", config.ml_env_dir, RUN_MARK))
    return swarm, fanout.peer_run(config, base, f"{config.ml_env_dir}/incoming/{RUN_MARK}",
                                  f"{config.ml_env_dir}/objects", env_owner(config), {"seed": adopt, "leech": adopt})


def mend_store(config: HostConfig, fleet: FleetContext, state: MlEnvState, cache_dir: Path, plan: EnvPlan) -> None:
    """What the probe found amiss in the host's store, each in the log and the report (drift in a dry run), then
    mended: damaged objects get a good copy; envs swapped for links are removed (or replaced, the wanted one:
    `plan_env`); a kept env's tree that differs from its manifest is mended in place."""
    notes: list[str] = []
    if state.damaged:
        damaged = repairable(fleet, cache_dir, state)
        notes.append(f"{len(damaged)} damaged object(s) ({damaged[0][0][:12]}…): a good copy is sent and linked at "
                     "each of their paths")
        repair_objects(name="Repair damaged objects of the env store", env_dir=config.ml_env_dir,
                       cache_dir=cache_dir, damaged=damaged, owner=env_owner(config))
    notes += [f"envs/{env} is a link, not a tree of the store: it is {'replaced' if env == plan.wanted else 'removed'}"
              for env in state.swapped]
    for env, listing in sorted(state.trees.items()):
        manifest = read_tree(cache_dir, env)
        if manifest is None or f"envs/{env}" in plan.remove:
            continue  # an env this control node never unpacked cannot be checked; one about to go need not be
        held = host_tree(manifest, listing)
        drift = tree_drift(manifest, held)
        if any(drift):
            notes.append(f"envs/{env} differs from its manifest: {drift.summary()}: mended from the manifest")
            install_env(name=f"Mend the tree of {env}", env_dir=config.ml_env_dir,
                        source=fleet.stored_env(env, cache_dir), owner=env_owner(config), held=held)
    record = report[host.name]
    for note in notes:
        host.log(f"ML env store: {note}")
        record.changed("ML env")
    if record.env:
        record.env.store = notes


def plan_gate(gpus: GpuState, plan: EnvPlan, source: EnvSource, cached: Manifest | None) -> GpuState | None:
    """The GPUs the gate checks the env against (None: no gate: no switch, or no GPU), with its plan-time checks
    made before anything changes where the control node holds the env's manifest (CACHED)."""
    gate = gpus if plan.activate and gpus.gpus else None
    if gate and cached is not None:  # the plan-time checks, before anything changes
        problem = record_gate(host.name, cached, gate_problem(gate, cached))
        if problem:
            raise HostProblem(problem)
    elif gate:  # a pinned env only on the host: nothing to check against but the host itself
        host.log(f"GPU gate, {source.env}: no manifest on the control node, so the smoke test alone decides")
    return gate


def check_active_env(config: HostConfig, state: MlEnvState, base: BaseImage, plan: EnvPlan) -> bool:
    """With ml_env_check_active, the import check of the env that stays active: now where the host holds the base
    image, else (returns True) once it is on the host, by the switch operation."""
    placed = state.image_id != base.id  # the base image reaches the host in this run: nothing can run it yet
    recheck = config.ml_env_check_active and not plan.activate and placed
    if recheck:
        host.log(f"ML env: the import check of {plan.wanted} runs once the base image is on the host")
    if config.ml_env_check_active and not plan.activate and not placed:
        failure = host.get_fact(EnvImportCheckFact, env_dir=config.ml_env_dir, env=plan.wanted, image_id=base.id,
                                python=base.python)
        if failure:
            report[host.name].changed("ML env")
            fail_host("ML env", f"the active env {plan.wanted} fails its import check: {failure}")
    return recheck


@step("ML env cleanup")
def cleanup(config: HostConfig, plan: EnvPlan | NoEnv | None):
    """After the stack switched: remove envs beyond `keep_envs` and unfinished transfers."""
    if isinstance(plan, EnvPlan) and plan.remove:
        remove_old_envs(name=f"Remove {len(plan.remove)} old env(s) or unfinished transfer(s)",
                        env_dir=config.ml_env_dir, paths=plan.remove, owner=env_owner(config))
