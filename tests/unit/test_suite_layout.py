"""The suite can be collected: pytest's default import mode imports one module per basename."""

import ast
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).parents[1]


def test_no_two_test_modules_share_a_basename():
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []


def test_no_test_module_imports_another():
    """Shared helpers live in modules of their own (tests/integration/fleet_helpers.py, fixtures)."""
    importing = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            importing += [f"{path.relative_to(TESTS)} imports {name}" for name in names
                          if name.split(".")[-1].startswith("test_")]
    assert importing == []
