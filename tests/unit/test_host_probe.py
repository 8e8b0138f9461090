"""One probe for several facts: run with /bin/sh, each part equals its fact run alone."""

import subprocess

from tasks.facts import HostProbe, ModelCacheState, PathStates, StackState
from tasks.gpu import NvidiaGpus


def run(command: str) -> list[str]:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=60).stdout.splitlines()


def test_each_part_is_what_its_fact_reads_alone(tmp_path):
    (tmp_path / "srv").mkdir(mode=0o750)
    (tmp_path / "cache" / "hub" / "models--org--name" / "blobs").mkdir(parents=True)
    (tmp_path / "cache" / "hub" / "models--org--name" / "blobs" / ("a" * 40)).write_text("x")
    parts = (
        ("paths", PathStates, {"paths": (str(tmp_path / "srv"), str(tmp_path / "absent"))}),
        ("models", ModelCacheState, {"cache_dir": str(tmp_path / "cache"), "folders": ("models--org--name",), "hashes": True}),
        ("gpus", NvidiaGpus, {}),
        ("stack", StackState, {"compose_dir": str(tmp_path / "none"), "project": "p", "repository": "mlstack-none"}),
    )
    probe = HostProbe()
    combined = probe.process(run(probe.command(parts=parts)))

    assert combined == {name: fact().process(run(fact().command(**kwargs))) for name, fact, kwargs in parts}
    assert set(combined["paths"]) == {str(tmp_path / "srv")}
    assert combined["models"].repos["models--org--name"].blobs == {"a" * 40: 1}
    assert combined["stack"].containers == {} and combined["stack"].compose is None  # nothing printed: still a state
