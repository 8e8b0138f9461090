"""Rollout order and the arguments that limit each pyinfra run to its batch."""

import pytest

from tasks.rollout import batches
from tasks.runner import limit_args


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
