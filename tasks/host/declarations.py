"""What the user's compose project itself declares that a host must provide, checked at plan time, before
anything on the host changes (else `docker compose up` finds it, after the project's files were replaced):

- the `external: true` volumes and networks its active services use: compose only looks them up;
- a service's own GPU request (`deploy.resources.reservations.devices` for `gpu` or the nvidia driver,
  `gpus:`, `runtime: nvidia`): it goes through the GPU gate as `service_gpus` does.

The compose side is pure (`external_resources`, `gpu_asks`: functions of compose's config); the host side
reads the stack probe's `volume`/`network` lines (`read_name`) and the GPU probe (`GpuState`).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from .gpu_checks import Gpu

NVIDIA_CTK = "run `nvidia-ctk runtime configure --runtime=docker` on it and restart docker"


@dataclass(frozen=True)
class External:
    """A volume or network the project declares `external: true`: compose only looks it up on the host (and
    fails `up` without it), so the host must have it already."""

    kind: str  # "volume" or "network"
    name: str  # its name on the host: its `name:`, else its key
    services: tuple[str, ...]  # the services that use it

    @property
    def create(self) -> str:
        """The command that makes it on a host."""
        return f"docker {self.kind} create {shlex.quote(self.name)}"


def external_resources(model: dict, services: list[str]) -> list[External]:
    """The `external: true` volumes and networks of MODEL (compose's config: `services`, `volumes`, `networks`)
    that SERVICES use, as compose checks them at `up`: a volume mount whose source is a top-level volume, and
    each network a service joins (`default` for one that names none and has no `network_mode`). One declared
    but used by none of SERVICES is left out, as compose leaves it. Volumes first, each kind by name."""
    used: dict[tuple[str, str], list[str]] = {}
    for service in services:
        spec = (model.get("services") or {}).get(service) or {}
        for mount in spec.get("volumes") or []:
            if isinstance(mount, dict) and mount.get("type", "volume") == "volume" and mount.get("source"):
                used.setdefault(("volume", str(mount["source"])), []).append(service)
        joined = spec.get("networks")
        if joined is None and "network_mode" not in spec:
            joined = ["default"]
        for key in joined or []:  # a mapping (compose's config) or a list
            used.setdefault(("network", str(key)), []).append(service)
    found = []
    for (kind, key), users in used.items():
        declared = (model.get(f"{kind}s") or {}).get(key)
        if isinstance(declared, dict) and str(declared.get("external")).lower() == "true":
            found.append(External(kind, str(declared.get("name") or key), tuple(dict.fromkeys(users))))
    return sorted(found, key=lambda external: (external.kind != "volume", external.name))


def declares_externals(project) -> bool:
    """Whether a `ComposeProject` declares any top-level volume or network `external` (before interpolation,
    so whatever a variable makes of it): then the stack probe lists the host's volumes and networks."""
    return any(isinstance(declared, dict) and declared.get("external") not in (None, False, "false")
               for declared in (*project.volumes.values(), *project.networks.values()))


def read_name(line: str, kind: str) -> str | None:
    """The name on a probe line `KIND "NAME"` (docker's `{{json .Name}}`: one line, any byte escaped), or None
    for a line that is not one. What the host says is untrusted: anything but a JSON string is no name."""
    if not line.startswith(f"{kind} "):
        return None
    try:
        name = json.loads(line[len(kind) + 1:])
    except ValueError:
        return None
    return name if isinstance(name, str) and name else None


def missing_externals(externals: list[External], volumes: frozenset[str], networks: frozenset[str]) -> list[str]:
    """A problem for each of EXTERNALS the host lacks (VOLUMES, NETWORKS: the names it has), naming the
    command that makes it."""
    have = {"volume": volumes, "network": networks}
    return [f"external {external.kind} {external.name!r} (used by {', '.join(external.services)}) is not on this "
            f"host: create it with `{external.create}`"
            for external in externals if external.name not in have[external.kind]]


@dataclass(frozen=True)
class GpuAsk:
    """One place where a service's own compose definition asks for GPUs."""

    where: str  # "deploy.resources.reservations.devices", "gpus" or "runtime"
    text: str  # what it says there: "driver nvidia, count all, capabilities gpu"
    count: int | None = None  # how many GPUs; None: all of them, or those DEVICE_IDS name
    device_ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def _strings(value) -> list[str]:
    return [value] if isinstance(value, str) else [text for item in value for text in _strings(item)] \
        if isinstance(value, list) else []


def _device_ask(where: str, entry) -> GpuAsk:
    """A device request (an entry of `deploy.resources.reservations.devices` or of `gpus`) as a GpuAsk."""
    if not isinstance(entry, dict):  # `gpus: all` as written, before compose's config makes it a list
        entry = {"count": entry}
    if entry.get("count") in (-1, "-1"):  # "all", as compose's interpolated config writes it
        entry = {**entry, "count": "all"}
    shown = [f"{key} {', '.join(map(str, value)) if isinstance(value, list) else value}"
             for key in ("driver", "count", "device_ids", "capabilities")
             if (value := entry.get(key)) not in (None, [], "")]
    count = entry.get("count")
    number = count if isinstance(count, int) and not isinstance(count, bool) else \
        int(count) if isinstance(count, str) and count.isdigit() else None
    return GpuAsk(where, ", ".join(shown) or "count all", number if number is None or number >= 0 else None,
                  tuple(str(device) for device in entry.get("device_ids") or []))


def gpu_asks(definition: dict) -> list[GpuAsk]:
    """What a service's own compose DEFINITION asks for in GPUs: each device reservation whose `capabilities`
    include `gpu` or whose `driver` is `nvidia`, each entry of compose's service-level `gpus:`, and
    `runtime: nvidia`. Empty for a service that asks for none. Interpolated or not, the same places."""
    asks = []
    devices = (((definition.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    for entry in devices if isinstance(devices, list) else []:
        if isinstance(entry, dict) and (entry.get("driver") == "nvidia"
                                        or "gpu" in _strings(entry.get("capabilities"))):
            asks.append(_device_ask("deploy.resources.reservations.devices", entry))
    gpus = definition.get("gpus")
    for entry in gpus if isinstance(gpus, list) else [gpus] if gpus else []:
        asks.append(_device_ask("gpus", entry))
    if definition.get("runtime") == "nvidia":
        asks.append(GpuAsk("runtime", "nvidia"))
    return asks


def gpu_ask_problems(service: str, asks: list[GpuAsk], gpus: list[Gpu], docker_gpus: str,
                     runtimes: tuple[str, ...]) -> list[str]:
    """Why a host with GPUS, whose docker gives containers GPUs as DOCKER_GPUS says ("runtime", "cdi", "") and
    has RUNTIMES, cannot give SERVICE what its own definition asks for (ASKS); empty: it can."""
    if not asks:
        return []
    what = "; ".join(map(str, asks))
    if not gpus:
        return [f"service {service} asks for GPUs ({what}), and this host has none (no nvidia-smi): deploy it to "
                "GPU hosts only, or give it a compose profile this host's stack_profiles leave out"]
    if not docker_gpus:
        return [f"service {service} asks for GPUs ({what}), and this host's docker cannot give containers GPUs (no "
                "nvidia runtime and no CDI spec for nvidia.com/gpu): install the NVIDIA Container Toolkit and "
                f"{NVIDIA_CTK}"]
    problems = []
    for ask in asks:
        if ask.where == "runtime":
            if "nvidia" not in runtimes:
                problems.append(f"service {service} asks for runtime: nvidia, and this host's docker has no runtime "
                                f"named nvidia (its runtimes: {', '.join(runtimes) or 'none read'}): {NVIDIA_CTK}")
        elif docker_gpus == "cdi":
            problems.append(f"service {service} asks for GPUs ({ask}) through the nvidia driver, and this host's "
                            f"docker gives containers GPUs through CDI only: {NVIDIA_CTK}")
        elif ask.count is not None and ask.count > len(gpus):
            problems.append(f"service {service} asks for {ask.count} GPU(s) ({ask}), and this host has {len(gpus)}")
        else:
            indices, uuids = {str(gpu.index) for gpu in gpus}, {gpu.uuid for gpu in gpus}
            unknown = [device for device in ask.device_ids if (device.isdigit() and device not in indices)
                       or (device.startswith("GPU-") and device not in uuids)]
            if unknown:
                problems.append(f"service {service} asks for GPU {unknown[0]} ({ask}), and this host has no such GPU "
                                f"(its GPUs: {', '.join(sorted(indices, key=int))})")
    return problems


def declaration_problems(model: dict, services: list[str], volumes: frozenset[str] | None,
                         networks: frozenset[str] | None, gpus: list[Gpu], docker_gpus: str,
                         runtimes: tuple[str, ...]) -> list[str]:
    """Why this host cannot run SERVICES of MODEL (compose's config, interpolated) as the project declares them:
    the external volumes and networks it lacks (VOLUMES, NETWORKS: the names the probe read; None when it read
    none, the project declaring no external one), then each service's own GPU request the host cannot meet."""
    externals = external_resources(model, services)
    problems = [] if volumes is None or networks is None else missing_externals(externals, volumes, networks)
    for service in services:
        definition = (model.get("services") or {}).get(service) or {}
        problems += gpu_ask_problems(service, gpu_asks(definition), gpus, docker_gpus, runtimes)
    return problems
