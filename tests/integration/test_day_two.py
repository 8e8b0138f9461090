"""Operating a converged fleet: the rollout's host selection as pyinfra reads it, whole-release rollbacks
and a switch to another compose project."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleet_helpers import mlstack, new_requirements, project_copy, sent_to

from rehearsal import hub

REPO = Path(__file__).parents[2]
COMPOSE = "/srv/mlstack/compose"


@pytest.mark.heavy
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


RERANKER = REPO / "files/stacks/reranker"
PROJECT = "mlstack-reranker"


def release_state(fleet, record, project: str = PROJECT) -> dict:
    """What a release is, as the host shows it: each service's image id and mlstack labels, the env `active`
    names, and the sha256 of every file of the compose directory (.env included)."""
    containers = fleet.ssh(record, f"docker ps -q --filter label=com.docker.compose.project={project} | xargs -r "
                                   "docker inspect -f '{{index .Config.Labels \"com.docker.compose.service\"}} "
                                   "{{.Image}} {{index .Config.Labels \"mlstack.env-id\"}} "
                                   "{{index .Config.Labels \"mlstack.models\"}} {{.State.Health.Status}}'")
    files = fleet.ssh(record, f"cd {COMPOSE} && find . -type f ! -path './.next/*' | sort | xargs sha256sum")
    active = fleet.ssh(record, "readlink /srv/mlstack/ml-env/active || true").strip()
    return {"containers": sorted(containers.splitlines()), "files": files, "active": active}


@pytest.mark.heavy
def test_a_rollback_puts_the_whole_release_back_from_the_host_without_building_or_sending(fleet, tmp_path):
    fleet.wipe()
    commits = hub.ensure_repos()
    first = fleet.deploy("--data", f"stack={project_copy(tmp_path, 'a')}")
    assert first.returncode == 0, first.output[-3000:]
    a = {record.name: release_state(fleet, record) for record in fleet.hosts}
    models = json.dumps([{"repo_id": hub.MINILM, "revision": commits[hub.MINILM]["main"]},
                         {"repo_id": hub.NESTED, "revision": commits[hub.NESTED]["v1"]}])
    second = fleet.deploy("--data", f"stack={project_copy(tmp_path, 'b')}", "--data", new_requirements(tmp_path),
                          "--data", f"models={models}", "--data", 'stack_env={"RELEASE_NOTE": "b"}')
    assert second.returncode == 0, second.output[-3000:]
    b = {record.name: release_state(fleet, record) for record in fleet.hosts}
    for record in fleet.hosts:  # image, env, a model commit, the project's files and .env all changed
        before, after = a[record.name], b[record.name]
        assert before["active"] != after["active"] and before["files"] != after["files"]
        assert {line.split()[0]: line.split()[1:4] for line in before["containers"]}["reranker"] != \
            {line.split()[0]: line.split()[1:4] for line in after["containers"]}["reranker"]

    sent = {record.name: sent_to(fleet, record) for record in fleet.hosts}
    back = mlstack(fleet, "rollback", "inventory/rehearsal.py", "--canary", "1")
    assert back.returncode == 0, back.stdout + back.stderr[-3000:]
    for record in fleet.hosts:
        assert release_state(fleet, record) == a[record.name]  # the same image ids, env, models, files, healthy
        assert sent_to(fleet, record) - sent[record.name] < 1_000_000  # commands and answers, no image or env
    assert "rollout: canary: host1" in back.stdout and "building" not in back.stderr

    again = mlstack(fleet, "rollback", "inventory/rehearsal.py")  # back to b: the previous release now
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert {record.name: release_state(fleet, record) for record in fleet.hosts} == b


@pytest.mark.heavy
def test_a_project_switch_brings_the_old_project_down_and_a_rollback_brings_it_back(fleet, tmp_path):
    fleet.wipe()
    assert fleet.deploy().returncode == 0
    (tmp_path / "greeter").mkdir()
    (tmp_path / "greeter/docker-compose.yml").write_text(
        "services:\n  greeter:\n    image: ${MLSTACK_BASE_IMAGE}\n    pull_policy: never\n"
        "    command: [python3, -m, http.server, '8095']\n")
    plan = fleet.deploy("--dry", "--data", f"stack={tmp_path / 'greeter'}", "--data", "http_checks=[]",
                        "--data", "ml_services={}", "--data", "service_gpus={}", "--data", "service_models={}")
    assert plan.returncode == 0, plan.output[-3000:]
    assert f"stack greeter: replaces project {PROJECT}" in plan.output
    switch = fleet.deploy("--data", f"stack={tmp_path / 'greeter'}", "--data", "http_checks=[]",
                          "--data", "ml_services={}", "--data", "service_gpus={}", "--data", "service_models={}")
    assert switch.returncode == 0, switch.output[-3000:]
    for record in fleet.hosts:
        projects = fleet.ssh(record, "docker ps -a --format '{{.Label \"com.docker.compose.project\"}}' | sort -u")
        assert projects.split() == ["greeter"]  # no container of the old project is left, running or not
    back = mlstack(fleet, "rollback", "inventory/rehearsal.py", "--canary", "0")
    assert back.returncode == 0, back.stdout + back.stderr[-3000:]
    for record in fleet.hosts:
        projects = fleet.ssh(record, "docker ps --format '{{.Label \"com.docker.compose.project\"}}' | sort -u")
        assert projects.split() == [PROJECT]
        assert json.loads(fleet.ssh(record, "curl -fsS http://127.0.0.1:8080/health"))["status"] == "ok"
