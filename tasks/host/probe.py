"""One round trip per host: every fact the deploy decides from, read by one `HostProbe`.

Each concern owns its part (`<concern>.probe_part(config)`: its fact and the fact's arguments);
deploy.py hands the parts to `probe_host` and each concern plans from its own value. A part that
fails (its program exits non-zero, its output is not what its fact reads, e.g. a broken
`nvidia-smi`, or its output stops before its end marker) fails that host only.

What a host prints is carried as base64 (`carried`, `received`): pyinfra reads a command's output
through paramiko, which decodes each line strictly and stops reading at the first byte that is not
UTF-8 (a file name a local user chose), with the exit status still 0. Decoded here, such a byte
becomes `\\xNN` and every line after it still arrives; each part's end marker says it finished.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass, field
from typing import Any

from pyinfra import host
from pyinfra.api import FactBase

from . import deadline
from .failure import fail_host

FRAME = "@@mlstack-fact "  # "@@mlstack-fact <mark> <part>" opens a part's output
END = "@@mlstack-fact-end "  # "@@mlstack-fact-end <mark> <part> <status>" closes it: the part finished
# <mark> is new for every probe, so no output of a part (a file name it prints) can pose as either


def carried(command: str) -> str:
    """COMMAND with its output made safe to read back: stdout as base64 (read with `received`), stderr with
    every byte that is not printable ASCII shown as '?' (pyinfra only shows it)."""
    return ("{ { " + command + "\n} 2>&1 1>&3 3>&- | LC_ALL=C tr -c '\\n\\40-\\176' '?' >&2 3>&-; } 3>&1 | base64")


def received(output: list[str], cut: bool = False) -> list[str]:
    """The lines one or more `carried` commands printed: every byte kept, one that is not UTF-8 as `\\xNN`.
    ValueError when the output is not base64 (then it is not what the commands sent). Each line is decoded
    alone (base64 writes 57 bytes a line), so outputs sent one after another read as one. CUT: the command
    was stopped, so its last line may end anywhere: it is left out if it does not decode."""
    chunks = []
    for number, line in enumerate(output):
        try:
            chunks.append(base64.b64decode(line, validate=True))
        except binascii.Error as error:
            if cut and number == len(output) - 1:
                break
            raise ValueError(f"its output is not the base64 it sends ({error})") from None
    data = b"".join(chunks)
    lines = data.decode("utf-8", errors="backslashreplace").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


@dataclass(frozen=True)
class ProbePart:
    name: str
    fact: type[FactBase]
    arguments: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class PartFailure:
    """What a part gave instead of its value."""

    message: str


class HostProbe(FactBase):
    """Several facts in one round trip: each part's command runs in its own subshell, between its frame and
    its end marker (with its exit status), and the lines it printed go to that fact's own process(); a part
    whose end marker is missing or not 0 is a `PartFailure`, never an empty value."""

    def command(self, parts: tuple[ProbePart, ...]) -> str:
        self.facts = {part.name: part.fact() for part in parts}
        self.mark = secrets.token_hex(8)
        # each frame and each part's output is sent on its own, as it ends: a probe stopped at its deadline has
        # sent the frame of the part that was running, and everything before it
        return "\n".join(
            carried(f"echo '{FRAME}{self.mark} {part.name}'") + "\n" + carried(
                f"( {self.facts[part.name].command(**part.arguments)}\n)\necho \"{END}{self.mark} {part.name} $?\"")
            for part in parts)

    def process(self, output: list[str]) -> dict[str, Any]:
        output, expired = deadline.stopped_at(output)
        try:
            lines = received(output, cut=bool(expired))
        except ValueError as error:
            return {name: PartFailure(str(error)) for name in self.facts}
        frame, end = f"{FRAME}{self.mark} ", f"{END}{self.mark} "
        parts: dict[str, list[str]] = {}
        statuses: dict[str, str] = {}
        current = None
        for line in lines:
            if line.startswith(frame):
                current = parts.setdefault(line[len(frame):], [])
            elif line.startswith(end):
                name, _, status = line[len(end):].rpartition(" ")
                statuses.setdefault(name, status)
                current = None
            elif current is not None:
                current.append(line)
        return {name: _value(fact, parts.get(name), statuses.get(name), expired) for name, fact in self.facts.items()}


def _value(fact: FactBase, lines: list[str] | None, status: str | None, expired: str) -> Any:
    """A part's value from the LINES it printed (None: it did not start) and its STATUS (None: it did not end);
    EXPIRED: what deadline.sh said when it stopped the probe ("" if it did not)."""
    if status is None and expired:
        return PartFailure(expired if lines is not None else "not read: the probe stopped at its deadline before it")
    lines = lines or []
    if status is None:
        return PartFailure(f"its output stopped before its end marker, after {len(lines)} line(s): it did not finish")
    if status != "0":
        return PartFailure(f"its program exited with status {status}")
    try:
        return fact.process(lines)
    except Exception as error:  # noqa: BLE001 (whatever a fact makes of bad output, it is this host's problem)
        return PartFailure(str(error))


def probe_values(*parts: ProbePart) -> dict[str, Any]:
    """Each part's value or PartFailure, by name, in one round trip."""
    # a probe stopped at its deadline (deadline.py) is read too: its parts say which one was running
    values = host.get_fact(HostProbe, parts=parts, _success_exit_codes=[0, deadline.EXPIRED]) or {}
    # None: the probe printed nothing at all
    return {part.name: values.get(part.name, PartFailure("the probe printed nothing")) for part in parts}


def probe_host(*parts: ProbePart) -> tuple | None:
    """The value of each part, in the order given; None when a part failed (the host is failed then)."""
    values = probe_values(*parts)
    failures = [f"{part.name}: {values[part.name].message}" for part in parts
                if isinstance(values[part.name], PartFailure)]
    if failures:
        fail_host("Host probe", "the host probe failed: " + "; ".join(failures))
        return None
    return tuple(values[part.name] for part in parts)
