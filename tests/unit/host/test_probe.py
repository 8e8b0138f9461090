"""One probe for several facts: run with /bin/sh, each part equals its fact run alone."""

import subprocess
from dataclasses import replace

from tasks.host.directories import DirectoriesFact
from tasks.host.gpus import GpuFact
from tasks.host.models import ModelCacheFact
from tasks.host.probe import HostProbe, ProbePart
from tasks.host.stack import StackFact


def run(command: str) -> list[str]:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=60).stdout.splitlines()


def test_each_part_is_what_its_fact_reads_alone(tmp_path):
    (tmp_path / "srv").mkdir(mode=0o750)
    (tmp_path / "cache" / "hub" / "models--org--name" / "blobs").mkdir(parents=True)
    (tmp_path / "cache" / "hub" / "models--org--name" / "blobs" / ("a" * 40)).write_text("x")
    parts = (
        ProbePart("paths", DirectoriesFact, {"paths": (str(tmp_path / "srv"), str(tmp_path / "absent"))}),
        ProbePart("models", ModelCacheFact, {"cache_dir": str(tmp_path / "cache"), "folders": ("models--org--name",),
                                             "hashes": True}),
        ProbePart("gpus", GpuFact),
        ProbePart("stack", StackFact, {"compose_dir": str(tmp_path / "none"), "project": "p",
                                       "repository": "mlstack-none"}),
    )
    probe = HostProbe()
    combined = probe.process(run(probe.command(parts=parts)))

    alone = {part.name: part.fact().process(run(part.fact().command(**part.arguments))) for part in parts}
    # Free space is read twice, moments apart, while other processes write: compare all but it.
    assert replace(combined["models"], free_bytes=0) == replace(alone.pop("models"), free_bytes=0)
    assert {name: value for name, value in combined.items() if name != "models"} == alone
    assert set(combined["paths"]) == {str(tmp_path / "srv")}
    assert combined["models"].repos["models--org--name"].blobs == {"a" * 40: 1}
    assert combined["stack"].containers == {} and combined["stack"].compose is None  # nothing printed: still a state
