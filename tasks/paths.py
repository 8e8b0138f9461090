"""Where the deploy's own files are: the host programs, the shipped compose projects and requirements.

A leaf module (it imports nothing of ours), so every other module may use it. From a checkout, `files/`
lies beside `tasks/`; installed, the package `mlstack` is `tasks/` with `files/` inside it (pyproject.toml).
"""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
FILES = next(path for path in (PACKAGE / "files", PACKAGE.parent / "files") if path.is_dir())
STACKS = FILES / "stacks"
