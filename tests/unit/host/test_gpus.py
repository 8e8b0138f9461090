"""The GPU fact: nvidia-smi's csv parsed, and the compose device reservation made from it.

The fixtures follow nvidia-smi's output for
`--query-gpu=index,uuid,name,memory.total,driver_version --format=csv,noheader,nounits`
(fields joined by ", ", no header, no units); their UUIDs are made up.
"""

import subprocess
from pathlib import Path

import pytest

from tasks.host.gpus import Gpu, GpuFact, GpuFactError, device_reservation

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def test_eight_a100_host():
    gpus = GpuFact().process(fixture_lines("nvidia-smi-8xa100.txt"))
    assert [gpu.index for gpu in gpus] == list(range(8))
    assert gpus[0] == Gpu(0, "GPU-d11acecc-227d-5b32-137b-c759953335c8", "NVIDIA A100-SXM4-80GB", 81920, "535.183.01")
    assert {(gpu.name, gpu.memory_mib, gpu.driver) for gpu in gpus} == {("NVIDIA A100-SXM4-80GB", 81920, "535.183.01")}
    assert len({gpu.uuid for gpu in gpus}) == 8


def test_two_gpu_host_keeps_names_with_spaces():
    assert GpuFact().process(fixture_lines("nvidia-smi-rtx4090-a4000.txt")) == [
        Gpu(0, "GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4", "NVIDIA GeForce RTX 4090", 24564, "550.54.15"),
        Gpu(1, "GPU-0dcfaed9-4cbb-6d5b-e1f2-a6529be3d61a", "NVIDIA RTX A4000", 16376, "550.54.15"),
    ]


def test_a_name_holding_the_separator_is_kept_whole():
    line = "3, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, Vendor X, Model 9, 1024, 550.54.15"
    assert GpuFact().process([line]) == [Gpu(3, "GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4", "Vendor X, Model 9", 1024,
                                             "550.54.15")]


def test_gpus_come_sorted_by_index_and_blank_lines_are_skipped():
    lines = fixture_lines("nvidia-smi-rtx4090-a4000.txt")
    assert [gpu.index for gpu in GpuFact().process([lines[1], "", lines[0]])] == [0, 1]


def test_no_output_is_no_gpu():
    # pyinfra calls default() when the command prints nothing (nvidia-smi absent)
    assert GpuFact.default() == []
    assert GpuFact().process([]) == []


@pytest.mark.parametrize("line", [
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.",
    "0, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, NVIDIA GeForce RTX 4090, [N/A], 550.54.15",
    "0, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, NVIDIA GeForce RTX 4090, 24564",
    "zero, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, NVIDIA GeForce RTX 4090, 24564, 550.54.15",
    "0, 04e3f7c4-4d05-fe38-482c-5a96411275e4, NVIDIA GeForce RTX 4090, 24564, 550.54.15",
    "0,GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4,NVIDIA GeForce RTX 4090,24564,550.54.15",
    "0, GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4, , 24564, 550.54.15",
])
def test_a_malformed_line_fails_naming_the_line(line):
    good = fixture_lines("nvidia-smi-rtx4090-a4000.txt")[0]
    with pytest.raises(GpuFactError) as error:
        GpuFact().process([good, line])
    message = str(error.value)
    assert message.startswith(f"nvidia-smi line 2: {line!r}: "
                              "expected 'index, uuid, name, memory.total (MiB), driver_version'")


def test_command_prints_nothing_and_succeeds_without_nvidia_smi(tmp_path):
    result = subprocess.run(["/bin/sh", "-c", GpuFact().command()], capture_output=True, text=True,
                            env={"PATH": str(tmp_path)})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_command_runs_the_query_when_nvidia_smi_exists(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    result = subprocess.run(["/bin/sh", "-c", GpuFact().command()], capture_output=True, text=True,
                            env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert result.stdout == "--query-gpu=index,uuid,name,memory.total,driver_version --format=csv,noheader,nounits\n"


def test_device_reservation_names_every_gpu_by_uuid_in_index_order():
    gpus = GpuFact().process(fixture_lines("nvidia-smi-rtx4090-a4000.txt"))
    assert device_reservation(list(reversed(gpus))) == {"devices": [{
        "driver": "nvidia",
        "device_ids": ["GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4", "GPU-0dcfaed9-4cbb-6d5b-e1f2-a6529be3d61a"],
        "capabilities": ["gpu"],
    }]}


def test_device_reservation_on_a_cpu_host_is_none():
    assert device_reservation([]) is None
