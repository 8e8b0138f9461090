"""Operating a converged fleet: the rollout's host selection as pyinfra reads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]
COMPOSE = "/srv/mlstack/compose"


def mlstack(fleet, *args: str) -> subprocess.CompletedProcess:
    """`mlstack ARGS` (as `python -m tasks.cli`) against the test fleet, from the checkout."""
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "MLSTACK_FLEET": fleet.fleet.name}, timeout=900)


def test_a_rollout_limited_to_a_group_leaves_an_excluded_host_out_and_does_not_count_it_failed(fleet):
    fleet.wipe()
    first, second = fleet.hosts
    result = mlstack(fleet, "rollout", "inventory/rehearsal.py", "--limit", "rehearsal", "--exclude", second.name,
                     "--canary", "0", "--max-fail", "0")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"rollout: batch 1: {first.name}\n" in result.stdout
    assert second.name not in result.stdout.split("\n", 1)[1]  # neither deployed nor listed as failed
    assert fleet.ssh(first, f"test -f {COMPOSE}/.env && echo deployed").strip() == "deployed"
    assert fleet.ssh(second, "test -e /srv/mlstack && echo touched || echo untouched").strip() == "untouched"
