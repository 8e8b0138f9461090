"""The GPU fact: gpu_probe.sh's lines parsed, and the compose device reservation made from it.

`nvidia-smi-h100.txt`, `nvidia-smi-h200.txt` and `nvidia-smi-unknown-field.txt` are real captures from
an H100 and an H200 host (driver 580.159.04; tests/real_gpu/h100-run.log, h200-run.log). The other
fixtures follow nvidia-smi's format for the same query: fields joined by ", ", no header, no units;
their UUIDs are made up.
"""

import subprocess
from pathlib import Path

import pytest

from tasks.host.gpu_checks import QUERY, Gpu, parse_gpus
from tasks.host.gpus import BASIC_QUERY, GpuFact, GpuFactError, GpuState, device_reservation

FIXTURES = Path(__file__).parent / "fixtures"
H100 = Gpu(0, "GPU-debb9e23-c0ec-7841-1fe5-3487b53614e5", "NVIDIA H100 80GB HBM3", 81559, "580.159.04", "9.0", False)


def fixture_lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def probe_lines(name: str, docker: str = "runtime") -> list[str]:
    return [f"gpu {line}" for line in fixture_lines(name)] + [f"docker {docker}"]


def test_a_real_h100_capture():
    assert GpuFact().process(probe_lines("nvidia-smi-h100.txt")) == GpuState((H100,), "runtime")


def test_a_real_h200_capture():
    assert GpuFact().process(probe_lines("nvidia-smi-h200.txt", "none")) == GpuState((Gpu(
        0, "GPU-1d688dec-27c5-8d5e-6547-5e555adc48a6", "NVIDIA H200", 143771, "580.159.04", "9.0", False),), "")


def test_eight_a100_host():
    state = GpuFact().process(probe_lines("nvidia-smi-8xa100.txt", "cdi"))
    assert [gpu.index for gpu in state.gpus] == list(range(8))
    assert state.docker_gpus == "cdi"
    assert {(gpu.name, gpu.memory_mib, gpu.driver, gpu.capability) for gpu in state.gpus} == {
        ("NVIDIA A100-SXM4-80GB", 81920, "535.183.01", "8.0")}
    assert [gpu.mig for gpu in state.gpus] == [True, True, False, False, False, False, False, False]
    assert len({gpu.uuid for gpu in state.gpus}) == 8


def test_two_gpu_host_keeps_names_with_spaces_and_gpus_without_mig():
    assert GpuFact().process(probe_lines("nvidia-smi-rtx4090-a4000.txt", "none")).gpus == (
        Gpu(0, "GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4", "NVIDIA GeForce RTX 4090", 24564, "550.54.15", "8.9", None),
        Gpu(1, "GPU-0dcfaed9-4cbb-6d5b-e1f2-a6529be3d61a", "NVIDIA RTX A4000", 16376, "550.54.15", "8.6", None),
    )


def test_a_driver_without_compute_cap_gives_five_fields_and_no_capability():
    state = GpuFact().process(["gpu 0, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, Tesla K80, 11441, 470.82.01",
                               "docker runtime"])
    assert state.gpus == (Gpu(0, "GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4", "Tesla K80", 11441, "470.82.01"),)
    assert state.gpus[0].capability == ""


def test_a_name_holding_the_separator_is_kept_whole():
    line = "gpu 3, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, Vendor X, Model 9, 1024, 550.54.15, 8.9, [N/A]"
    assert GpuFact().process([line]).gpus == (
        Gpu(3, "GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4", "Vendor X, Model 9", 1024, "550.54.15", "8.9", None),)


def test_gpus_come_sorted_by_index_and_blank_lines_are_skipped():
    lines = probe_lines("nvidia-smi-rtx4090-a4000.txt")
    assert [gpu.index for gpu in GpuFact().process([lines[1], "gpu ", lines[0]]).gpus] == [0, 1]


def test_no_output_is_a_cpu_host():
    # pyinfra calls default() when the command prints nothing (nvidia-smi absent)
    assert GpuFact.default() == GpuState((), "")
    assert GpuFact().process([]) == GpuState((), "")


@pytest.mark.parametrize("line", [
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.",
    (FIXTURES / "nvidia-smi-unknown-field.txt").read_text().splitlines()[0],
    "0, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, NVIDIA GeForce RTX 4090, [N/A], 550.54.15, 8.9, [N/A]",
    "0, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, NVIDIA GeForce RTX 4090, 24564",
    "zero, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, NVIDIA GeForce RTX 4090, 24564, 550.54.15, 8.9, [N/A]",
    "0, 04e3f7c4-4d05-fe38-482c-5a96411275e4, NVIDIA GeForce RTX 4090, 24564, 550.54.15, 8.9, [N/A]",
    "0,GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4,NVIDIA GeForce RTX 4090,24564,550.54.15,8.9,[N/A]",
    "0, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, , 24564, 550.54.15, 8.9, [N/A]",
])
def test_a_malformed_line_fails_naming_the_line(line):
    with pytest.raises(GpuFactError) as error:
        GpuFact().process([*probe_lines("nvidia-smi-rtx4090-a4000.txt")[:1], f"gpu {line}"])
    assert str(error.value).startswith(
        f"nvidia-smi line 2: {line.strip()!r}: expected "
        "'index, uuid, name, memory.total (MiB), driver_version, compute_cap, mig.mode.current'")


def run_probe(tmp_path, nvidia_smi: str | None, docker: str | None = None) -> subprocess.CompletedProcess:
    for name, text in (("nvidia-smi", nvidia_smi), ("docker", docker)):
        if text is not None:
            (tmp_path / name).write_text(text)
            (tmp_path / name).chmod(0o755)
    return subprocess.run(["/bin/sh", "-c", GpuFact().command()], capture_output=True, text=True,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"})


def test_the_probe_prints_nothing_without_nvidia_smi(tmp_path):
    result = run_probe(tmp_path, None)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_probe_asks_the_full_query_and_reads_dockers_runtimes(tmp_path):
    result = run_probe(tmp_path, '#!/bin/sh\necho "$@"\n', '#!/bin/sh\necho "io.containerd.runc.v2 nvidia runc "\n')
    assert result.stdout.splitlines() == [f"gpu --query-gpu={QUERY} --format=csv,noheader,nounits",
                                          "runtimes io.containerd.runc.v2 nvidia runc ", "docker runtime"]
    assert GpuFact().process(result.stdout.splitlines()[1:]).runtimes == ("io.containerd.runc.v2", "nvidia", "runc")


def test_an_old_driver_is_asked_the_basic_query(tmp_path):
    # nvidia-smi's own answer to a field it does not know (captured), and its exit status 2
    unknown = (FIXTURES / "nvidia-smi-unknown-field.txt").read_text()
    old = (f"#!/bin/sh\ncase $1 in *compute_cap*) printf %s '{unknown}'; exit 2 ;; esac\n"
           "echo '0, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, Tesla K80, 11441, 470.82.01'\n")
    result = run_probe(tmp_path, old, "#!/bin/sh\nexit 1\n")
    assert result.stdout.splitlines() == [
        "gpu 0, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, Tesla K80, 11441, 470.82.01", "runtimes ", "docker none"]
    assert BASIC_QUERY in QUERY


def test_a_broken_driver_is_passed_on_for_the_parser_to_quote(tmp_path):
    broken = ("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\n"
              "exit 9\n")
    result = run_probe(tmp_path, broken)
    with pytest.raises(GpuFactError, match="couldn't communicate with the NVIDIA driver"):
        GpuFact().process(result.stdout.splitlines())


def test_device_reservation_names_every_gpu_by_uuid_in_index_order():
    gpus = parse_gpus(fixture_lines("nvidia-smi-rtx4090-a4000.txt"))
    assert device_reservation(list(reversed(gpus))) == {"devices": [{
        "driver": "nvidia",
        "device_ids": ["GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4", "GPU-0dcfaed9-4cbb-6d5b-e1f2-a6529be3d61a"],
        "capabilities": ["gpu"],
    }]}


def test_device_reservation_on_a_cpu_host_is_none():
    assert device_reservation([]) is None
