"""Rollout order and the arguments that limit each pyinfra run to its batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.fleet.rollout import HostOutcome, batches, failed_hosts, parse_options, share
from tasks.fleet.runner import DeployRun, limit_args

REPO = Path(__file__).parents[3]


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


RECORDS = {  # as tasks/report.py writes them
    "gpu-01": {"result": "ok", "failure": None, "changes": ["ML env", "models", "stack"],
               "env": {"before": "env-1111111111111111", "after": "env-44d10bd977d1ee58", "action": "install"},
               "models": [{"repo_id": "org/model", "revision": "main", "commit": "c" * 40, "bytes_to_send": 93_000_000,
                           "action": "transfer"}],
               "stack": {"project": "mlstack", "images": ["mlstack-reranker:0123"], "health": "healthy",
                         "unhealthy": [],
                         "services": {"reranker": {"action": "recreate", "reason": "env id a → b"},
                                      "docs": {"action": "keep", "reason": ""}}}},
    "gpu-02": {"result": "failed", "failure": {"cause": "unreachable", "step": "",
                                               "message": "Could not connect "
                                                          "([Errno None] Unable to connect to port 22)"}},
    "gpu-03": {"result": "failed", "failure": {"cause": "locked", "step": "",
                                               "message": "another deploy holds this host's lock "
                                                          "(ci@ctl pid 7 since T)"}},
    "gpu-04": {"result": "failed", "failure": {"cause": "step", "step": "Stack | Up and healthy: mlstack",
                                               "message": "stack mlstack: not healthy within 20s: reranker"},
               "env": {"before": "env-44d10bd977d1ee58", "after": "env-44d10bd977d1ee58", "action": "none"},
               "stack": {"project": "mlstack", "images": ["mlstack-reranker:0123"], "health": "unhealthy",
                         "unhealthy": ["reranker"],
                         "services": {"reranker": {"action": "recreate", "reason": "exited"}}}},
    "gpu-05": {"result": "failed", "failure": {"cause": "step", "step": "ML env",
                                               "message": "the runtime base image 'python:3.11' is not on this host"}},
    "gpu-06": {"result": "failed", "failure": {"cause": "step", "step": "ML env",
                                               "message": "GPU gate, env-44d10bd977d1ee58: driver 570.124.06 is older"},
               "gpus": [{"index": i, "uuid": f"GPU-{i}", "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559,
                         "driver": "570.124.06", "capability": "9.0", "mig": False} for i in range(8)],
               "gate": {"env": "env-44d10bd977d1ee58", "cuda": "13.0", "result": "refused", "problem": "driver …"}},
}


def test_each_row_of_the_table_comes_from_the_report():
    rows = {name: HostOutcome.from_record(record) for name, record in RECORDS.items()}
    assert rows["gpu-01"].env == "env-1111111111111111 → env-44d10bd977d1ee58"
    assert rows["gpu-01"].models == [f"org/model@main ({'c' * 12}): 93.0 MB sent"]
    assert rows["gpu-01"].stack == "mlstack: reranker (env id a → b)" and rows["gpu-01"].result == "ok"
    assert rows["gpu-02"].stack == "unreachable: Could not connect ([Errno None] Unable to connect to port 22)"
    assert rows["gpu-03"].stack.startswith("locked: another deploy holds this host's lock (ci@ctl pid 7")
    assert rows["gpu-04"].env == "env-44d10bd977d1ee58" and rows["gpu-04"].result == "FAILED"
    assert rows["gpu-04"].stack == "mlstack: reranker (exited); unhealthy: reranker"
    assert rows["gpu-05"].stack == "failed at ML env: the runtime base image 'python:3.11' is not on this host"
    assert rows["gpu-01"].gpus == "" and rows["gpu-01"].details() == rows["gpu-01"].models  # a CPU host
    assert rows["gpu-06"].details() == [
        "GPUs: 8× NVIDIA H100 80GB HBM3, driver 570.124.06; gate refused: env-44d10bd977d1ee58 (CUDA 13.0)"]


def test_what_the_env_store_held_amiss_is_listed_under_the_hosts_row():
    store = ["envs/env-44d10bd977d1ee58 differs from its manifest: 1 extra (lib/x.pth): mended from the manifest",
             "envs/env-1111111111111111 is a link, not a tree of the store: it is removed"]
    record = {**RECORDS["gpu-01"], "env": {**RECORDS["gpu-01"]["env"], "store": store}}
    assert HostOutcome.from_record(record).details() == [f"ML env store: {note}" for note in store] + \
        HostOutcome.from_record(RECORDS["gpu-01"]).models


def test_failed_hosts_are_read_from_the_report_and_a_run_that_did_not_execute_fails_its_whole_batch():
    batch = ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]
    run = DeployRun(1, "", 0.0, report=RECORDS, executed=True)
    assert failed_hosts(run, batch) == ["gpu-02", "gpu-03", "gpu-04"]
    assert failed_hosts(DeployRun(1, "[gpu-01] ... crashed", 0.0), batch) == batch
    assert failed_hosts(DeployRun(0, "", 0.0, report={"gpu-01": RECORDS["gpu-01"]}, executed=True), ["gpu-01"]) == []
    # Planned but stopped before executing (an error while planning another host): nothing was deployed.
    assert failed_hosts(DeployRun(1, "", 0.0, report={"gpu-01": RECORDS["gpu-01"]}), ["gpu-01"]) == ["gpu-01"]


INVENTORY = '''
gpus = (["gpu-01", "gpu-02", "gpu-03"], {"stack": "reranker"})
cpus = (["cpu-01", "cpu-02"], {"stack": "reranker"})
'''


def hosts_chosen(tmp_path, limit: list[str], exclude: list[str]) -> subprocess.CompletedProcess:
    """inventory_hosts over INVENTORY, in a process of its own: pyinfra's CLI machinery monkey-patches the
    standard library with gevent when imported, which this test process must not be."""
    (tmp_path / "inventory.py").write_text(INVENTORY)
    code = ("import json, sys; from tasks.fleet.rollout import inventory_hosts; "
            "names, config = inventory_hosts('inventory.py', *json.loads(sys.argv[1])); "
            "print(json.dumps([names, config.stack]))")
    return subprocess.run([sys.executable, "-c", code, json.dumps([limit, [], exclude])], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("limit", "exclude", "expected"), [
    ([], [], ["gpu-01", "gpu-02", "gpu-03", "cpu-01", "cpu-02"]),
    (["gpus"], [], ["gpu-01", "gpu-02", "gpu-03"]),  # a group, as pyinfra reads --limit
    (["gpus", "cpu-0[2]"], ["gpu-02"], ["gpu-01", "gpu-03", "cpu-02"]),
    ([], ["cpus"], ["gpu-01", "gpu-02", "gpu-03"]),  # excluded hosts are not part of the rollout at all
])
def test_limit_and_exclude_take_hosts_globs_and_groups_as_pyinfra_does(tmp_path, limit, exclude, expected):
    chosen = hosts_chosen(tmp_path, limit, exclude)
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout) == [expected, "reranker"]


def test_nothing_left_to_roll_out_is_said_before_any_run(tmp_path):
    chosen = hosts_chosen(tmp_path, ["gpus"], ["gpus"])
    assert chosen.returncode == 1 and "no host of inventory.py is left by --limit gpus --exclude gpus" in chosen.stderr


@pytest.mark.parametrize(("hosts", "amount", "expected"), [(8, "3", 3), (8, "25%", 2), (8, "10%", 0), (3, "100%", 3)])
def test_a_threshold_is_a_count_or_a_share_of_the_hosts_rounded_down(hosts, amount, expected):
    assert share(hosts, amount) == expected


def test_the_rollout_flags_are_read_and_bad_values_refused(capsys):
    options, rest = parse_options(["inv.py", "--canary", "2", "--batch", "50%", "--max-fail", "10%", "--pause", "1.5",
                                   "--data", "k=v"], "mlstack rollout")
    assert (options.canary, options.batch, options.max_fail, options.pause, rest) == (2, "50%", "10%", 1.5,
                                                                                       ["--data", "k=v"])
    for flag, value in (("--batch", "0"), ("--batch", "101%"), ("--max-fail", "-1"), ("--canary", "5%")):
        with pytest.raises(SystemExit) as stopped:
            parse_options(["inv.py", flag, value], "mlstack rollout")
        assert stopped.value.code == 2 and f"not {value!r}" in capsys.readouterr().err
