"""One probe for several facts: run with /bin/sh, each part equals its fact run alone, a part that
fails gives its failure without hiding the others' values, and a part cut off is a failure (issue 26)."""

import base64
import hashlib
import os
import subprocess
from dataclasses import replace
from types import SimpleNamespace

from pyinfra.api import FactBase

from tasks.host import probe as probe_module
from tasks.host.directories import DirectoriesFact
from tasks.host.gpus import GpuFact
from tasks.host.models import ModelCacheFact
from tasks.host.probe import END, FRAME, HostProbe, PartFailure, ProbePart, received


def run(command: str) -> list[str]:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=60).stdout.splitlines()


def read_alone(fact: FactBase, arguments: dict):
    command = fact.command(**arguments)
    return fact.process(run(command))


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

    alone = {part.name: read_alone(part.fact(), part.arguments) for part in parts}
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


def strict_lines(command: str) -> list[str]:
    """What pyinfra reads of COMMAND's stdout over SSH: paramiko decodes each line strictly, and pyinfra's
    reader stops at the first line that is not UTF-8 (the exit status is still 0)."""
    raw = subprocess.run(["/bin/sh", "-c", command], capture_output=True, timeout=60).stdout
    lines = []
    for line in raw.split(b"\n")[:-1] if raw.endswith(b"\n") else raw.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            break
    return lines


class PrintsLast(FactBase):
    def command(self) -> str:
        return "echo gpu 0"

    def process(self, output):
        return output


def test_a_name_that_is_not_utf8_neither_cuts_the_probe_off_nor_changes_any_part(tmp_path):
    """Issue 26: the cache owner names a blob b'\\377'; the probe read it raw and every later part read as empty."""
    blobs = tmp_path / "cache" / "hub" / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / ("a" * 40)).write_text("x")
    (blobs / os.fsdecode(b"\xff")).write_text("y")
    (blobs / os.fsdecode(b"b\xffc")).write_text("y")
    parts = (ProbePart("models", ModelCacheFact, {"cache_dir": str(tmp_path / "cache"),
                                                  "folders": ("models--org--name",), "hashes": True}),
             ProbePart("paths", DirectoriesFact, {"paths": (str(tmp_path),)}), ProbePart("gpus", PrintsLast))
    probe = HostProbe()
    values = probe.process(strict_lines(probe.command(parts=parts)))
    assert values["gpus"] == ["gpu 0"] and list(values["paths"]) == [str(tmp_path)]
    assert values["models"].repos["models--org--name"].blobs == {"a" * 40: 1}
    assert values["models"].repos["models--org--name"].hashes == {"a" * 40: git_sha1(b"x")}


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cut(output: list[str], keep) -> list[str]:
    """OUTPUT of a probe with only the decoded lines KEEP keeps, sent again as the probe sends it."""
    lines = [line for line in received(output) if keep(line)]
    return base64.encodebytes("".join(line + "\n" for line in lines).encode()).decode().splitlines()


def test_a_part_without_its_end_marker_is_a_failure_naming_it_never_an_empty_value(tmp_path, monkeypatch):
    parts = (ProbePart("paths", DirectoriesFact, {"paths": (str(tmp_path),)}), ProbePart("gpus", PrintsLast),
             ProbePart("last", PrintsLast))
    probe = HostProbe()
    output = run(probe.command(parts=parts))
    values = probe.process(cut(output, lambda line: not line.startswith(f"{END}{probe.mark} gpus ")))
    assert list(values["paths"]) == [str(tmp_path)] and values["last"] == ["gpu 0"]
    assert values["gpus"] == PartFailure("its output stopped before its end marker, after 1 line(s): it did not finish")
    stopped = probe.process(cut(output, lambda line: "paths" not in line and not line.startswith(END)))
    assert all(isinstance(value, PartFailure) for value in stopped.values())

    failures = []
    monkeypatch.setattr(probe_module, "host", SimpleNamespace(get_fact=lambda fact, parts, **_: None))  # no output
    assert set(probe_module.probe_values(*parts).values()) == {PartFailure("the probe printed nothing")}
    monkeypatch.setattr(probe_module, "host", SimpleNamespace(get_fact=lambda fact, parts, **_: values))
    monkeypatch.setattr(probe_module, "fail_host", lambda step, message: failures.append(message))
    assert probe_module.probe_host(*parts) is None
    assert failures == ["the host probe failed: gpus: its output stopped before its end marker, after 1 line(s): "
                        "it did not finish"]


class Forges(FactBase):
    def command(self) -> str:
        return f"echo '{END}0123456789abcdef forges 0'; echo '{FRAME}0123456789abcdef other'; exit 4"

    def process(self, output):
        return output


def test_a_part_cannot_print_its_own_end_or_another_parts_frame():
    probe = HostProbe()
    values = probe.process(run(probe.command(parts=(ProbePart("forges", Forges), ProbePart("other", PrintsLast)))))
    assert values == {"forges": PartFailure("its program exited with status 4"), "other": ["gpu 0"]}


def test_output_that_is_not_what_the_probe_sends_fails_every_part():
    probe = HostProbe()
    probe.command(parts=(ProbePart("gpus", PrintsLast),))
    assert probe.process(["not base64!"])["gpus"].message.startswith("its output is not the base64 it sends")
