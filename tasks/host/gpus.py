"""GPUs: what nvidia-smi reports on a host (this concern's part of the host probe), and the compose
device reservation that gives them to a service."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from pyinfra import host
from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from tasks.host.probe import ProbePart
from tasks.report import report

QUERY = "index,uuid,name,memory.total,driver_version"
FIELDS = "index, uuid, name, memory.total (MiB), driver_version"
UUID = re.compile(r"GPU-[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
DRIVER = re.compile(r"\d+(\.\d+)+")


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str  # GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx: stable across reboots and PCI re-enumeration
    name: str
    memory_mib: int
    driver: str


class GpuFactError(FactProcessError):
    """nvidia-smi printed a line that is not a GPU record (pyinfra then fails that host only)."""


def parse_gpu_line(number: int, line: str) -> Gpu:
    """One line of `--format=csv,noheader,nounits`: fields joined by ", ", never quoted.

    The name is the only field that could hold the separator, so index and uuid are taken from
    the left, memory and driver from the right, and the name is whatever lies between.
    """
    parts = line.strip().split(", ")
    if len(parts) >= 5:
        index, uuid, *name, memory, driver = (part.strip() for part in parts)
        name = ", ".join(name)
        if index.isdigit() and UUID.fullmatch(uuid) and name and memory.isdigit() and DRIVER.fullmatch(driver):
            return Gpu(int(index), uuid, name, int(memory), driver)
    raise GpuFactError(f"nvidia-smi line {number}: {line.strip()!r}: expected {FIELDS!r}, e.g. "
                       "'0, GPU-5a7f8c3e-1b2d-4e6f-9a8b-0c1d2e3f4a5b, NVIDIA A100-SXM4-80GB, 81920, 535.183.01'")


def parse_gpus(output: list[str]) -> list[Gpu]:
    gpus = [parse_gpu_line(number, line) for number, line in enumerate(output, 1) if line.strip()]
    return sorted(gpus, key=lambda gpu: gpu.index)


class GpuFact(FactBase):
    """The host's NVIDIA GPUs, by index; [] when nvidia-smi is absent (a CPU host).

    nvidia-smi that is present but cannot reach the driver prints its complaint on stdout
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver…"); that line
    is not a GPU record, so the fact fails that host with the line quoted rather than calling it a
    CPU host.
    """

    def command(self) -> str:
        return (f"command -v nvidia-smi >/dev/null && "
                f"nvidia-smi --query-gpu={QUERY} --format=csv,noheader,nounits || true")

    @staticmethod
    def default() -> list[Gpu]:
        return []  # pyinfra calls default(), not process(), when the command prints nothing

    def process(self, output: list[str]) -> list[Gpu]:
        return parse_gpus(output)


def probe_part() -> ProbePart:
    return ProbePart("gpus", GpuFact)


def report_gpus(gpus: list[Gpu]) -> list[Gpu]:
    """GPUS, recorded in this host's report."""
    report[host.name].gpus = [asdict(gpu) for gpu in gpus]
    return gpus


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
