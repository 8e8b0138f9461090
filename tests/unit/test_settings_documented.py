"""Every setting has one default (group_data/all.py) and one README row that shows it."""

import re
import runpy
from pathlib import Path

from tasks.config import HostConfig

REPO = Path(__file__).parents[2]


def readme_rows() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", (REPO / "README.md").read_text(), flags=re.M)
    return dict(rows)


def test_defaults_cover_exactly_the_settings():
    defaults = {k for k in runpy.run_path(str(REPO / "inventory/group_data/all.py")) if not k.startswith("_")}
    assert defaults == set(HostConfig.model_fields)


def test_readme_table_lists_every_setting_with_its_default():
    defaults = {k: v for k, v in runpy.run_path(str(REPO / "inventory/group_data/all.py")).items()
                if not k.startswith("_")}
    rows = readme_rows()
    assert set(rows) == set(HostConfig.model_fields)
    for key, value in defaults.items():
        assert rows[key] == (f'"{value}"' if isinstance(value, str) else repr(value)), key
