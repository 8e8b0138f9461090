"""One round trip per host: every fact the deploy decides from, read by one `HostProbe`.

Each concern owns its part (`<concern>.probe_part(config)`: its fact and the fact's arguments);
deploy.py hands the parts to `probe_host` and each concern plans from its own value. A part that
fails (its program exits non-zero, or its output is not what its fact reads, e.g. a broken
`nvidia-smi`) fails that host only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyinfra import host
from pyinfra.api import FactBase

from .failure import fail_host

FRAME = "@@mlstack-fact "  # frames each part's output; no part prints a line starting so
FAILED = "@@mlstack-fact-failed "  # a part's program exited non-zero: its status follows


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
    """Several facts in one round trip: each part's command runs in its own subshell, and the lines
    it prints go to that fact's own process() (every part makes sense of no lines at all)."""

    def command(self, parts: tuple[ProbePart, ...]) -> str:
        self.facts = {part.name: part.fact() for part in parts}
        return "\n".join(f"echo '{FRAME}{part.name}'\n( {self.facts[part.name].command(**part.arguments)}\n) "
                         f"|| echo \"{FAILED}$?\"" for part in parts)

    def process(self, output: list[str]) -> dict[str, Any]:
        lines: dict[str, list[str]] = {}
        current = None
        for line in output:
            if line.startswith(FRAME):
                current = lines.setdefault(line[len(FRAME):], [])
            elif current is not None:
                current.append(line)
        return {name: _value(fact, lines.get(name, [])) for name, fact in self.facts.items()}


def _value(fact: FactBase, lines: list[str]) -> Any:
    if lines and lines[-1].startswith(FAILED):  # printed after the part, so its own output cannot pose as it
        return PartFailure(f"its program exited with status {lines[-1][len(FAILED):]}")
    try:
        return fact.process(lines)
    except Exception as error:  # noqa: BLE001 (whatever a fact makes of bad output, it is this host's problem)
        return PartFailure(str(error))


def probe_host(*parts: ProbePart) -> tuple | None:
    """The value of each part, in the order given; None when a part failed (the host is failed then)."""
    values = host.get_fact(HostProbe, parts=parts)
    failures = [f"{part.name}: {values[part.name].message}" for part in parts
                if isinstance(values[part.name], PartFailure)]
    if failures:
        fail_host("Host probe", "the host probe failed: " + "; ".join(failures))
        return None
    return tuple(values[part.name] for part in parts)
