"""GPUs as nvidia-smi reports them, and whether a CUDA env can run on them: pure functions, stdlib only
(so the same checks run on a GPU machine with nothing but Python, see tests/real_gpu/).

The gate's plan-time checks (`gate_problems`), in order:
1. the host's driver is at least the minimum for the env's CUDA major version (`MINIMUM_DRIVER`);
2. every GPU's compute capability is covered by the env's torch build (a native cubin or PTX), or,
   in an env without torch, by the CUDA runtime's own range (`RUNTIME_CAPABILITIES`);
3. docker can give containers GPUs: the nvidia runtime (or its hook) or a CDI spec for nvidia.com/gpu.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

QUERY = "index,uuid,name,memory.total,driver_version,compute_cap,mig.mode.current"
FIELDS = "index, uuid, name, memory.total (MiB), driver_version, compute_cap, mig.mode.current"
UUID = re.compile(r"GPU-[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
DRIVER = re.compile(r"\d+(\.\d+)+")
CAPABILITY = re.compile(r"(\d+)\.(\d+)")
MIG_MODES = {"Enabled": True, "Disabled": False, "[N/A]": None}
EXAMPLE = "0, GPU-5a7f8c3e-1b2d-4e6f-9a8b-0c1d2e3f4a5b, NVIDIA H100 80GB HBM3, 81559, 570.124.06, 9.0, Disabled"

# The minimum driver for each CUDA major version under minor version compatibility (Linux x86_64):
# NVIDIA, "CUDA Compatibility", Minor Version Compatibility, Table 1, and the CUDA Toolkit release
# notes, table "CUDA Toolkit and Minimum Required Driver Version for CUDA Minor Version Compatibility"
# (https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html).
MINIMUM_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
# The compute capabilities each CUDA runtime major version supports at all (the CUDA 12.0 release
# notes drop Kepler, sm_35/sm_37; the CUDA 13.0 release notes drop Maxwell, Pascal and Volta, below sm_75).
RUNTIME_CAPABILITIES = {11: (3, 5), 12: (5, 0), 13: (7, 5)}


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str  # GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx: stable across reboots and PCI re-enumeration
    name: str
    memory_mib: int
    driver: str
    capability: str = ""  # "9.0"; "" when the driver is too old to report it
    mig: bool | None = None  # MIG mode; None on a GPU without MIG


class GpuLineError(ValueError):
    """nvidia-smi printed a line that is not a GPU record."""


def parse_gpu_line(number: int, line: str) -> Gpu:
    """One line of `--format=csv,noheader,nounits`: fields joined by ", ", never quoted.

    The name is the only field that could hold the separator, so index and uuid are taken from
    the left, the rest from the right, and the name is whatever lies between. A driver too old for
    `compute_cap` is asked without it (files/host/gpu_probe.sh): its lines have five fields.
    """
    parts = [part.strip() for part in line.strip().split(", ")]
    if len(parts) >= 7 and CAPABILITY.fullmatch(parts[-2]) and parts[-1] in MIG_MODES:
        capability, mig, parts = parts[-2], MIG_MODES[parts[-1]], parts[:-2]
    else:
        capability, mig = "", None
    if len(parts) >= 5:
        index, uuid, *names, memory, driver = parts
        name = ", ".join(names)
        if index.isdigit() and UUID.fullmatch(uuid) and name and memory.isdigit() and DRIVER.fullmatch(driver):
            return Gpu(int(index), uuid, name, int(memory), driver, capability, mig)
    raise GpuLineError(f"nvidia-smi line {number}: {line.strip()!r}: expected {FIELDS!r}, e.g. {EXAMPLE!r}")


def parse_gpus(output: list[str]) -> list[Gpu]:
    gpus = [parse_gpu_line(number, line) for number, line in enumerate(output, 1) if line.strip()]
    return sorted(gpus, key=lambda gpu: gpu.index)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


@dataclass(frozen=True)
class CudaEnv:
    """What the gate needs to know of an env (its manifest's `cuda`)."""

    runtime: str  # the nvidia-cuda-runtime distribution's version, e.g. "12.8.90"
    torch_archs: tuple[str, ...] = ()  # torch's build arch list ("sm_90", "compute_90"…); () without torch

    @property
    def major_minor(self) -> str:
        return ".".join(self.runtime.split(".")[:2])


def driver_problem(driver: str, cuda: CudaEnv) -> str | None:
    major = version_tuple(cuda.runtime)[0]
    minimum = MINIMUM_DRIVER.get(major)
    if minimum is None:
        return f"CUDA {cuda.major_minor} is not in the driver table (CUDA {sorted(MINIMUM_DRIVER)} are)"
    if version_tuple(driver) < version_tuple(minimum):
        older = f"CUDA {major - 1}" if major - 1 in MINIMUM_DRIVER else "an older CUDA"
        return (f"driver {driver} is older than {minimum}, the minimum for CUDA {cuda.major_minor}: "
                f"upgrade the driver or pin a {older} env")
    return None


def covers(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ARCH runs on a GPU of CAPABILITY: a cubin (sm_XY) on the same major
    version with a minor at least Y (sm_XYa only on X.Y itself); PTX (compute_XY) on X.Y and later."""
    match = re.fullmatch(r"(sm|compute)_(\d+?)(\d)([af]?)", arch)
    if not match:
        return False
    kind, major, minor, variant = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    if kind == "compute" and not variant:
        return capability >= (major, minor)
    if variant == "a":
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


def capability_problem(gpu: Gpu, cuda: CudaEnv) -> str | None:
    match = CAPABILITY.fullmatch(gpu.capability)
    if not match:
        return (f"GPU {gpu.index} ({gpu.name}) does not report its compute capability (driver {gpu.driver}): "
                "upgrade the driver")
    capability = (int(match.group(1)), int(match.group(2)))
    if cuda.torch_archs:
        if any(covers(arch, capability) for arch in cuda.torch_archs):
            return None
        return (f"GPU {gpu.index} ({gpu.name}) has compute capability {gpu.capability}, which the env's torch "
                f"build does not cover ({' '.join(cuda.torch_archs)}): use a torch build with sm_"
                f"{capability[0]}{capability[1]} or PTX for it")
    lowest = RUNTIME_CAPABILITIES.get(version_tuple(cuda.runtime)[0])
    if lowest and capability < lowest:
        return (f"GPU {gpu.index} ({gpu.name}) has compute capability {gpu.capability}, below "
                f"{lowest[0]}.{lowest[1]}, the lowest CUDA {cuda.major_minor} supports: use an older CUDA env")
    return None


def gate_problems(gpus: list[Gpu], docker_gpus: str, cuda: CudaEnv | None) -> list[str]:
    """Why this host cannot run a CUDA env (empty: it can). DOCKER_GPUS is how docker gives containers
    GPUs ("runtime", "cdi" or "" for no way). No GPU or no CUDA in the env: nothing to check."""
    if not gpus or cuda is None:
        return []
    problems = []
    driver = driver_problem(gpus[0].driver, cuda)  # one driver per host: nvidia-smi prints it on every line
    if driver:
        problems.append(driver)
    problems += [problem for gpu in gpus if (problem := capability_problem(gpu, cuda))]
    if not docker_gpus:
        problems.append("docker cannot give containers GPUs (no nvidia runtime and no CDI spec for nvidia.com/gpu): "
                        "install the NVIDIA Container Toolkit and run `nvidia-ctk runtime configure --runtime=docker`")
    return problems


def smoke_devices(gpus: list[Gpu]) -> str:
    """The CUDA device count the smoke test (files/host/gpu_smoke.py) expects in a container given every GPU:
    "N" exactly, or "N+" at least when a GPU is in MIG mode (CUDA then sees MIG instances, not that GPU)."""
    plain = sum(1 for gpu in gpus if not gpu.mig)
    return f"{plain + 1}+" if any(gpu.mig for gpu in gpus) else str(plain)


def assign_gpus(gpus: list[Gpu], service: str, request: str | int | tuple[int, ...]) -> list[Gpu]:
    """The GPUs SERVICE gets on a host with GPUS: "all" of them (none on a CPU host), the COUNT lowest
    indices, or exactly the indices asked for; a GpuRequestError when the host has too few."""
    ordered = sorted(gpus, key=lambda gpu: gpu.index)
    if request == "all":
        return ordered
    if isinstance(request, int):
        if request > len(ordered):
            raise GpuRequestError(f"service_gpus.{service} = {request}: this host has {len(ordered)} GPU(s)")
        return ordered[:request]
    if isinstance(request, str):  # validating lets no other text through
        raise GpuRequestError(f"service_gpus.{service} = {request!r}: expected \"all\", a count or a list of indices")
    by_index = {gpu.index: gpu for gpu in ordered}
    missing = [index for index in request if index not in by_index]
    if missing:
        have = ", ".join(str(index) for index in by_index) or "none"
        raise GpuRequestError(f"service_gpus.{service} = {list(request)}: this host has no GPU {missing[0]} "
                              f"(its GPUs: {have})")
    return [by_index[index] for index in request]


class GpuRequestError(ValueError):
    """A service asks for GPUs the host does not have."""
