"""Work in a directory a user owns runs as that user: what it creates is theirs, and root's own
directories need no switch."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tasks.host.transfer import as_owner


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
@pytest.mark.parametrize("owner", [(1000, 1000), (0, 1234), (0, 0)])
def test_what_the_command_creates_belongs_to_the_owner(owner):
    where = Path(tempfile.mkdtemp())  # pytest's tmp_path lies below a 0700 directory no other user can cross
    try:
        where.chmod(0o777)
        made = where / "made"
        result = subprocess.run(["sh", "-c", as_owner(*owner, f"touch {made}")], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert (made.stat().st_uid, made.stat().st_gid) == owner
    finally:
        shutil.rmtree(where)


def test_roots_own_directories_need_no_switch():
    assert as_owner(0, 0, "true") == "true"
