"""Every setting has one default (tasks/config.py, HostConfig) and one row in docs/settings.md that shows it."""

import re
from pathlib import Path

from tasks.config import DEFAULTS, HostConfig

REPO = Path(__file__).parents[2]
SETTINGS = REPO / "docs" / "settings.md"
TABLE_HEADING = "## Every setting"
README_MAX_LINES = 250


def settings_rows() -> list[tuple[str, str]]:
    """(name, default cell) of each row of the settings table: the rows under "## Every setting", up to the next
    second-level heading (the per-entry tables of `models` and `ml_services` come after it)."""
    text = SETTINGS.read_text()
    assert TABLE_HEADING in text, f"{SETTINGS} has no {TABLE_HEADING!r} section"
    section = text.split(TABLE_HEADING, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]
    return re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", section, flags=re.M)


def shown(value) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_every_setting_has_exactly_one_row():
    names = [name for name, _ in settings_rows()]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert duplicates == [], f"settings with more than one row: {duplicates}"
    assert set(names) == set(HostConfig.names()), (
        f"missing rows: {sorted(set(HostConfig.names()) - set(names))}; "
        f"rows of no setting: {sorted(set(names) - set(HostConfig.names()))}")


def test_each_row_shows_the_codes_default():
    rows = dict(settings_rows())
    for name in HostConfig.names():
        if name not in DEFAULTS:
            assert rows[name] == "(required)", name
        else:
            assert rows[name] == shown(DEFAULTS[name]), name


def test_stack_is_the_one_required_setting():
    assert [name for name in HostConfig.names() if name not in DEFAULTS] == ["stack"]
    assert dict(settings_rows())["stack"] == "(required)"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
