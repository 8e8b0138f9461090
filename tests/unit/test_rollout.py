"""Rollout order and the arguments that limit each pyinfra run to its batch."""

import pytest

from tasks.rollout import HostOutcome, batches, read_outcomes
from tasks.runner import DeployRun, limit_args


@pytest.mark.parametrize(("hosts", "canary", "batch", "expected"), [
    (10, 1, "25%", [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9]]),
    (2, 1, "1", [[0], [1]]),
    (3, 0, "2", [[0, 1], [2]]),
    (3, 5, "1", [[0, 1, 2]]),
    (1, 0, "1%", [[0]]),
])
def test_canary_first_then_batches_of_a_count_or_a_share(hosts, canary, batch, expected):
    names = [f"h{i}" for i in range(hosts)]
    assert batches(names, canary, batch) == [[f"h{i}" for i in group] for group in expected]


def test_each_host_gets_its_own_limit_flag():
    # pyinfra does not split --limit on commas: "a,b" would match no host at all.
    assert limit_args(["gpu-01", "gpu-02"]) == ["--limit", "gpu-01", "--limit", "gpu-02"]


def test_the_table_says_why_a_host_was_not_deployed():
    # The lines as pyinfra and the deploy print them.
    log = "\n".join([
        "    [gpu-01] ML env: env-44d10bd977d1ee58 (no change)",
        "    [gpu-02] Could not connect ([Errno None] Unable to connect to port 22 on 10.0.0.2)",
        "    [gpu-03] Deploy lock: another deploy holds this host's lock (ci@ctl pid 7 since 2026-11-25T10:00:00Z): "
        "wait for it to end, then run again",
    ])
    outcomes = {name: HostOutcome() for name in ("gpu-01", "gpu-02", "gpu-03")}
    read_outcomes(DeployRun(1, log, 0.0), outcomes)
    assert outcomes["gpu-01"].env == "env-44d10bd977d1ee58 (no change)" and outcomes["gpu-01"].stack == ""
    assert outcomes["gpu-02"].stack == "unreachable: [Errno None] Unable to connect to port 22 on 10.0.0.2"
    assert outcomes["gpu-03"].stack.startswith("locked: another deploy holds this host's lock (ci@ctl pid 7")
