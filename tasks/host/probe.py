"""One round trip per host: every fact the deploy decides from, read by one `HostProbe`.

Each concern owns its part (`<concern>.probe_part(config)`: its fact and the fact's arguments);
deploy.py hands the parts to `probe_host` and each concern plans from its own value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyinfra import host
from pyinfra.api import FactBase

FRAME = "@@mlstack-fact "  # frames each part's output; no part prints a line starting so


@dataclass(frozen=True)
class ProbePart:
    name: str
    fact: type[FactBase]
    arguments: dict = field(default_factory=dict, hash=False)


class HostProbe(FactBase):
    """Several facts in one round trip: each part's command runs in its own subshell, and the lines
    it prints go to that fact's own process() (every part makes sense of no lines at all)."""

    def command(self, parts: tuple[ProbePart, ...]) -> str:
        self.facts = {part.name: part.fact() for part in parts}
        return "\n".join(f"echo '{FRAME}{part.name}'\n( {self.facts[part.name].command(**part.arguments)}\n) || true"
                         for part in parts)

    def process(self, output: list[str]) -> dict[str, Any]:
        lines: dict[str, list[str]] = {}
        current = None
        for line in output:
            if line.startswith(FRAME):
                current = lines.setdefault(line[len(FRAME):], [])
            elif current is not None:
                current.append(line)
        return {name: fact.process(lines.get(name, [])) for name, fact in self.facts.items()}


def probe_host(*parts: ProbePart) -> tuple:
    """The value of each part, in the order given."""
    values = host.get_fact(HostProbe, parts=parts)
    return tuple(values[part.name] for part in parts)
