"""The GPU gate's plan-time checks: NVIDIA's driver table, compute capability coverage by a torch arch
list (native cubins and PTX) or by the CUDA runtime's range, docker's GPU support, and what the smoke
test expects. The H100 values are those of the real capture (tests/real_gpu/h100-run.log)."""

import pytest

from tasks.host.gpu_checks import (
    MINIMUM_DRIVER,
    CudaEnv,
    Gpu,
    capability_problem,
    covers,
    driver_problem,
    gate_problems,
    smoke_devices,
)

H100 = Gpu(0, "GPU-debb9e23-c0ec-7841-1fe5-3487b53614e5", "NVIDIA H100 80GB HBM3", 81559, "580.159.04", "9.0", False)
# torch 2.11.0+cu130's arch list, as torch._C._cuda_getArchFlags() printed it on that H100
CU130_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


def gpu(capability: str, driver: str = "580.159.04", index: int = 0, mig: bool | None = None) -> Gpu:
    return Gpu(index, "GPU-debb9e23-c0ec-7841-1fe5-3487b53614e5", "NVIDIA Test", 1024, driver, capability, mig)


def test_the_table_is_nvidias_minimum_per_cuda_major():
    assert MINIMUM_DRIVER == {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


@pytest.mark.parametrize(("driver", "runtime", "refused"), [
    ("580.159.04", "13.0.96", False),  # the real H100 host and its torch's CUDA runtime
    ("580.65.06", "13.0.48", False),  # exactly the minimum
    ("575.57.08", "13.0.48", True),
    ("525.60.13", "12.8.90", False),
    ("525.60.11", "12.8.90", True),
    ("470.82.01", "12.1.105", True),
    ("470.82.01", "11.8.89", False),
    ("1000.1", "12.8.90", False),  # numeric, not string, comparison
])
def test_driver_against_cuda_runtime(driver, runtime, refused):
    assert (driver_problem(driver, CudaEnv(runtime)) is not None) is refused


def test_an_old_driver_is_refused_saying_what_to_do():
    assert driver_problem("470.82.01", CudaEnv("12.8.90")) == (
        "driver 470.82.01 is older than 525.60.13, the minimum for CUDA 12.8: upgrade the driver or pin a CUDA 11 env")


def test_a_cuda_major_outside_the_table_is_refused():
    assert driver_problem("999.1", CudaEnv("14.0.1")) == "CUDA 14.0 is not in the driver table (CUDA [11, 12, 13] are)"


@pytest.mark.parametrize(("arch", "capability", "runs"), [
    ("sm_90", (9, 0), True),
    ("sm_80", (8, 6), True),  # a cubin runs on later minors of its major
    ("sm_86", (8, 0), False),  # not on earlier ones
    ("sm_90", (10, 0), False),  # nor on another major
    ("compute_90", (12, 0), True),  # PTX is JIT-compiled for anything later
    ("compute_90", (8, 9), False),
    ("sm_90a", (9, 0), True),  # arch-specific: that capability only
    ("sm_100a", (10, 3), False),
    ("sm_100f", (10, 3), True),  # family-specific: later minors of the major
    ("gfx90a", (9, 0), False),
])
def test_coverage_of_one_arch(arch, capability, runs):
    assert covers(arch, capability) is runs


def test_the_h100_is_covered_by_the_cu130_build():
    assert capability_problem(H100, CudaEnv("13.0.96", CU130_ARCHS)) is None


def test_a_capability_the_torch_build_lacks_is_refused():
    problem = capability_problem(gpu("6.0"), CudaEnv("12.8.90", ("sm_75", "sm_80", "sm_90")))
    assert problem == ("GPU 0 (NVIDIA Test) has compute capability 6.0, which the env's torch build does not cover "
                       "(sm_75 sm_80 sm_90): use a torch build with sm_60 or PTX for it")


def test_a_new_architecture_is_covered_by_ptx_only():
    assert capability_problem(gpu("12.1"), CudaEnv("12.8.90", ("sm_90", "compute_90"))) is None
    assert capability_problem(gpu("12.1"), CudaEnv("12.8.90", ("sm_80", "sm_90"))) is not None


def test_without_torch_the_cuda_runtime_range_decides():
    assert capability_problem(gpu("3.7"), CudaEnv("12.8.90")) == (
        "GPU 0 (NVIDIA Test) has compute capability 3.7, below 5.0, the lowest CUDA 12.8 supports: "
        "use an older CUDA env")
    assert capability_problem(gpu("7.0"), CudaEnv("13.0.96")) is not None  # CUDA 13 dropped Volta
    assert capability_problem(gpu("7.5"), CudaEnv("13.0.96")) is None


def test_an_unreported_capability_is_refused():
    assert "does not report its compute capability (driver 470.82.01)" in capability_problem(
        gpu("", "470.82.01"), CudaEnv("11.8.89"))


def test_gate_on_the_real_h100_passes():
    assert gate_problems([H100], "runtime", CudaEnv("13.0.96", CU130_ARCHS)) == []


def test_gate_lists_every_problem():
    problems = gate_problems([gpu("9.0", "470.82.01"), gpu("3.7", "470.82.01", 1)], "", CudaEnv("12.8.90"))
    assert [problem.split(" ")[0:2] for problem in problems] == [
        ["driver", "470.82.01"], ["GPU", "1"], ["docker", "cannot"]]


def test_no_gpu_or_no_cuda_in_the_env_is_nothing_to_check():
    assert gate_problems([], "", CudaEnv("12.8.90")) == []
    assert gate_problems([gpu("3.0", "400.1")], "", None) == []


def test_smoke_expects_each_gpu_and_one_device_for_any_mig_gpus():
    assert smoke_devices([H100]) == "1"
    assert smoke_devices([gpu("8.0", index=i) for i in range(8)]) == "8"
    assert smoke_devices([gpu("8.0", index=0, mig=True), gpu("8.0", index=1, mig=True), gpu("8.0", index=2)]) == "2+"
