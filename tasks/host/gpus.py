"""GPUs: what nvidia-smi reports on a host and how its docker gives containers GPUs (this concern's part
of the host probe), and the compose device reservation that gives them to a service. Parsing and the
gate's decisions are pure (tasks/host/gpu_checks.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pyinfra import host
from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from ..report import DockerGpus, report
from .gpu_checks import QUERY, Gpu, GpuLineError, parse_gpus
from .probe import ProbePart
from .programs import program

BASIC_QUERY = "index,uuid,name,memory.total,driver_version"  # what drivers before compute_cap (510) answer
DOCKER_GPUS: dict[str, DockerGpus] = {"runtime": "runtime", "cdi": "cdi", "none": ""}  # gpu_probe.sh's word: ours


@dataclass(frozen=True)
class GpuState:
    gpus: tuple[Gpu, ...]  # by index; () on a CPU host
    docker_gpus: DockerGpus  # how docker gives containers GPUs: "runtime" (nvidia runtime or hook), "cdi", or ""
    runtimes: tuple[str, ...] = ()  # docker's runtimes by name (`runtime: nvidia` needs "nvidia"); () on a CPU host


class GpuFactError(FactProcessError):
    """gpu_probe.sh printed a line that is not a GPU record (pyinfra then fails that host only)."""


class GpuFact(FactBase):
    """The host's NVIDIA GPUs, by index, and docker's way to give them to containers; no GPU when
    nvidia-smi is absent (a CPU host).

    nvidia-smi that is present but cannot reach the driver prints its complaint on stdout
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver…"); that line
    is not a GPU record, so the fact fails that host with the line quoted rather than calling it a
    CPU host.
    """

    def command(self) -> str:
        return program("gpu_probe.sh", QUERY, BASIC_QUERY)

    @staticmethod
    def default() -> GpuState:
        return GpuState((), "")  # pyinfra calls default(), not process(), when the command prints nothing

    def process(self, output: list[str]) -> GpuState:
        lines: list[str] = []
        docker: DockerGpus = ""
        runtimes: tuple[str, ...] = ()
        for line in output:
            key, _, value = line.partition(" ")
            if key == "gpu":
                lines.append(value)
            elif key == "docker" and value.strip() in DOCKER_GPUS:
                docker = DOCKER_GPUS[value.strip()]
            elif key == "runtimes":
                runtimes = tuple(value.split())
        try:
            return GpuState(tuple(parse_gpus(lines)), docker, runtimes)
        except GpuLineError as error:
            raise GpuFactError(str(error)) from None


def probe_part() -> ProbePart:
    return ProbePart("gpus", GpuFact)


def report_gpus(state: GpuState) -> GpuState:
    """The host's GPUs, recorded in this host's report."""
    record = report[host.name]
    record.gpus = [asdict(gpu) for gpu in state.gpus]
    record.docker_gpus = state.docker_gpus
    return state


def device_reservation(gpus: list[Gpu]) -> dict | None:
    """The value of a service's `deploy.resources.reservations`: every GPU of the host, by UUID.

    A mapping `{"devices": [...]}`, as compose requires of `reservations` (a bare list fails
    `docker compose config -q`: "reservations must be a mapping"). UUIDs, not indexes: they name
    the same card whatever the enumeration order; device_ids must be strings either way, and
    compose refuses `count` beside `device_ids`. None when the host has no GPU: a reservation for
    the nvidia driver on such a host fails `up` ("could not select device driver "nvidia"").
    """
    if not gpus:
        return None
    ids = [gpu.uuid for gpu in sorted(gpus, key=lambda gpu: gpu.index)]
    return {"devices": [{"driver": "nvidia", "device_ids": ids, "capabilities": ["gpu"]}]}
