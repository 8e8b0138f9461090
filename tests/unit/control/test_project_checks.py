"""The compose project against the settings (tasks/control/project_checks.py) and the fleet's validation
(tasks/validation.py). Reading a project runs `docker compose config` on the control node: the tests that read
one are marked `needs_compose` and skipped where the docker CLI is absent; the checks themselves run on a
project made here, without docker."""

import runpy
import shutil
from pathlib import Path

import pytest

from tasks.config import ConfigError, validate_settings
from tasks.control.compose_project import ComposeProject
from tasks.control.project_checks import project_setting_problems
from tasks.validation import validate_fleet, validate_host

EXAMPLE = runpy.run_path(str(Path(__file__).parents[3] / "inventory/example_archon.py"))["archon_hosts"][1]
DEFAULTS = {key: value for key, value in EXAMPLE.items() if not key.startswith(("_", "ssh_"))}  # no connection data
needs_compose = pytest.mark.skipif(shutil.which("docker") is None,
                                   reason="reads the compose project with `docker compose config` (docker CLI absent)")


def problems_for(**overrides):
    config, problems = validate_host("gpu-01", {**DEFAULTS, **overrides})
    return problems


def test_the_checks_need_no_docker_given_the_project(tmp_path):
    project = ComposeProject(Path("/nowhere"), ("compose.yaml",), "demo", {
        "web": {"image": "nginx", "environment": {"TOKEN": "${TOKEN}", "MODE": "${MODE:-fast}"}},
        "gpu": {"image": "x", "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}}})
    config, problems = validate_settings("gpu-01", {"stack": str(tmp_path), "ml_services": {"api": {}},
                                                    "service_gpus": {"gpu": 1}})
    assert problems == []
    found = project_setting_problems("gpu-01", config, project)
    assert found[0] == ("gpu-01: ml_services.api = {'ml_env': True, 'models': []}: a service of stack "
                        f"'{tmp_path}': web, gpu")
    assert found[1].startswith("gpu-01: service_gpus.gpu = 1: no entry for gpu: its compose definition asks for GPUs")
    assert found[2:] == [f"gpu-01: stack = '{tmp_path}': a value for ${{TOKEN}}, which web read without a default: "
                         "set it in stack_env or stack_secrets"]


@needs_compose
def test_every_problem_on_every_host_is_reported_at_once():
    hosts = [
        ("gpu-01", {**DEFAULTS, "stack_root_uid": -1}),
        ("gpu-02", {**DEFAULTS}),
        ("gpu-03", {**DEFAULTS, "ml_env_dir": "rel", "stack_root_mode": "9"}),
    ]
    with pytest.raises(ConfigError) as caught:
        validate_fleet(hosts)
    assert caught.value.problems == [
        "gpu-01: stack_root_uid = -1: expected an integer id from 0 to 4294967294",
        "gpu-03: stack_root_mode = '9': expected an octal mode such as '0755'",
        "gpu-03: ml_env_dir = 'rel': expected an absolute path such as '/srv/mlstack'",
    ]
    assert str(caught.value).startswith("invalid inventory data, nothing was changed:\n  gpu-01: stack_root_uid")


@needs_compose
def test_the_example_inventory_is_valid():
    example = runpy.run_path(str(Path(__file__).parents[3] / "inventory/example_gpu_fleet.py"))
    hosts, group_data = example["gpu_hosts"]
    assert group_data["stack"] == "/home/ops/ml-stack/compose"  # a placeholder: the team's own project
    configs = validate_fleet((name, {**group_data, "stack": "reranker", **data}) for name, data in hosts)
    assert configs["gpu-01.example.internal"].stack_root == "/data/mlstack"


@needs_compose
def test_a_service_naming_a_model_the_deploy_does_not_place_is_refused():
    assert problems_for(models=[{"repo_id": "Qwen/Qwen3-Reranker-0.6B"}],
                        service_models={"RERANKING_MODEL": "Qwen/Qwen3-Reranker-4B"}) == [
        "gpu-01: service_models.RERANKING_MODEL = 'Qwen/Qwen3-Reranker-4B': a repo_id from models "
        "(the stack must use a model the deploy places: Qwen/Qwen3-Reranker-0.6B)"
    ]
    assert problems_for(service_models={"reranking model": "Qwen/Qwen3-Reranker-0.6B"})[0].startswith(
        "gpu-01: service_models.reranking model = 'reranking model': expected an environment variable name")


@needs_compose
def test_a_stack_service_reading_a_model_setting_the_inventory_lacks_is_refused():
    assert problems_for(stack="reranker", ml_services={"reranker": {"models": ["RERANKING_MODEL"]}},
                        service_models={}, service_gpus={}) == [
        "gpu-01: service_models = {}: an entry for RERANKING_MODEL (ml_services: read by reranker)"
    ]


@needs_compose
def test_ml_services_name_services_of_the_project():
    assert problems_for(stack="reranker", ml_services={"rerankr": {}}, service_gpus={}) == [
        "gpu-01: ml_services.rerankr = {'ml_env': True, 'models': []}: a service of stack 'reranker': docs, reranker"]
    (problem,) = problems_for(ml_services={"archon-server": {"ml_env": "yes"}})
    assert problem.startswith("gpu-01: ml_services.archon-server.ml_env = 'yes': expected True or False"), problem


@needs_compose
def test_a_variable_read_without_a_default_needs_a_value_before_any_host_changes():
    assert problems_for(stack_secrets=["SUPABASE_URL"]) == [
        "gpu-01: stack = 'archon': a value for ${SUPABASE_SERVICE_KEY}, which archon-mcp, archon-server read "
        "without a default: set it in stack_env or stack_secrets"]
    assert problems_for(stack_secrets=[], stack_env={"SUPABASE_URL": "u", "SUPABASE_SERVICE_KEY": "k"}) == []
    # archon-agents reads it too, but only with the agents profile
    assert "archon-agents, archon-mcp" in problems_for(stack_secrets=["SUPABASE_URL"], stack_profiles=["agents"])[0]


def test_a_stack_directory_without_a_compose_file_is_refused(tmp_path):
    (problem,) = problems_for(stack=str(tmp_path))
    assert problem.startswith(f"gpu-01: stack = '{tmp_path}': a compose project docker compose can read: ")
    assert "none of compose.yaml, compose.yml, docker-compose.yml, docker-compose.yaml is there" in problem


def test_the_fleet_is_validated_once_however_many_hosts_ask_at_once(monkeypatch):
    """pyinfra runs the deploy for every host at once: the hosts after the first wait for its validation (which
    reads the compose project with docker compose) instead of each validating the fleet again."""
    import threading
    import time
    from types import SimpleNamespace

    import pyinfra

    from tasks import validation

    calls = []

    def slow_validation(hosts):
        calls.append(list(hosts))
        time.sleep(0.2)
        return {"gpu-01": "first", "gpu-02": "second"}

    monkeypatch.setattr(validation, "validate_fleet", slow_validation)
    monkeypatch.setattr(validation, "_fleet_configs", None)
    monkeypatch.setattr(pyinfra, "inventory", SimpleNamespace(get_active_hosts=lambda: []))
    found = {}
    askers = [threading.Thread(target=lambda name=name: found.setdefault(name, validation.host_config(
        SimpleNamespace(name=name)))) for name in ("gpu-01", "gpu-02")]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert found == {"gpu-01": "first", "gpu-02": "second"} and len(calls) == 1


@needs_compose
def test_service_gpus_name_services_of_the_stack():
    assert problems_for(service_gpus={"archon-srever": "all"}) == [
        "gpu-01: service_gpus.archon-srever = 'all': a service of stack 'archon': "
        "archon-agents, archon-frontend, archon-mcp, archon-server"]
