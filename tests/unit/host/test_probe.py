"""One probe for several facts: run with /bin/sh, each part equals its fact run alone, and a part that
fails gives its failure without hiding the others' values."""

import subprocess
from dataclasses import replace

from pyinfra.api import FactBase

from tasks.host.directories import DirectoriesFact
from tasks.host.gpus import GpuFact
from tasks.host.models import ModelCacheFact
from tasks.host.probe import HostProbe, PartFailure, ProbePart


def run(command: str) -> list[str]:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=60).stdout.splitlines()


class ExitsThree(FactBase):
    def command(self) -> str:
        return "echo partial; exit 3"

    def process(self, output):
        return output


class Unreadable(FactBase):
    def command(self) -> str:
        return "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver'"

    def process(self, output):
        return int(output[0])


def test_each_part_is_what_its_fact_reads_alone(tmp_path):
    (tmp_path / "srv").mkdir(mode=0o750)
    (tmp_path / "cache" / "hub" / "models--org--name" / "blobs").mkdir(parents=True)
    (tmp_path / "cache" / "hub" / "models--org--name" / "blobs" / ("a" * 40)).write_text("x")
    parts = (
        ProbePart("paths", DirectoriesFact, {"paths": (str(tmp_path / "srv"), str(tmp_path / "absent"))}),
        ProbePart("models", ModelCacheFact, {"cache_dir": str(tmp_path / "cache"), "folders": ("models--org--name",),
                                             "hashes": True}),
        ProbePart("gpus", GpuFact),
    )
    probe = HostProbe()
    combined = probe.process(run(probe.command(parts=parts)))

    alone = {part.name: part.fact().process(run(part.fact().command(**part.arguments))) for part in parts}
    # Free space is read twice, moments apart, while other processes write: compare all but it.
    assert replace(combined["models"], free_bytes=0) == replace(alone.pop("models"), free_bytes=0)
    assert {name: value for name, value in combined.items() if name != "models"} == alone
    assert set(combined["paths"]) == {str(tmp_path / "srv")}
    assert combined["models"].repos["models--org--name"].blobs == {"a" * 40: 1}


def test_a_failing_part_gives_its_failure_and_the_others_their_values(tmp_path):
    parts = (ProbePart("exits", ExitsThree), ProbePart("paths", DirectoriesFact, {"paths": (str(tmp_path),)}),
             ProbePart("unreadable", Unreadable))
    probe = HostProbe()
    values = probe.process(run(probe.command(parts=parts)))
    assert values["exits"] == PartFailure("its program exited with status 3")
    assert values["unreadable"] == PartFailure(
        "invalid literal for int() with base 10: "
        "'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver'")
    assert list(values["paths"]) == [str(tmp_path)]
