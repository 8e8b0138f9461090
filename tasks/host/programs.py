"""Programs that run on hosts are files of the project (`files/host/`), linted like the rest of it
(shellcheck, ruff). `program` turns one into a command: its text inlined, so running it costs no
upload and no extra round trip, and every argument quoted.
"""

from __future__ import annotations

import shlex
from functools import cache

from ..paths import FILES

PROGRAMS = FILES / "host"
INTERPRETERS = {".sh": "sh", ".py": "python3"}


@cache
def program_text(name: str) -> str:
    return (PROGRAMS / name).read_text()


def program(name: str, *args: str | int) -> str:
    """A command that runs `files/host/NAME` with ARGS: `sh -c TEXT NAME ARGS` or `python3 -c TEXT ARGS`."""
    interpreter = INTERPRETERS[name[name.rindex("."):]]
    zeroth = [name] if interpreter == "sh" else []  # sh takes $0 after the text; python's argv[0] is "-c"
    return " ".join([interpreter, "-c", shlex.quote(program_text(name)),
                     *(shlex.quote(str(arg)) for arg in [*zeroth, *args])])
