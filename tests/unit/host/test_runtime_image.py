"""What a deploy does about the ML env and its runtime base image, decided from the settings and the host's copy
of the image: pure logic, no host. (The projects are read by docker compose itself, the control node's CLI.)"""

from pathlib import Path

import pytest
import yaml

from tasks.control import fleet_context
from tasks.control.builder import BaseImage
from tasks.control.compose_project import project_of
from tasks.control.registry import RegistryImage
from tasks.host.ml_env import MlEnvState, NoEnv, env_wanted, host_problem, probe_part
from tasks.host.runtime_image import BasePlan, base_archive, plan_base
from tasks.host.stack import stack_base
from tasks.host.stack_render import render
from tasks.validation import validate_host

BASE = BaseImage("registry.corp:5000/ml/python:3.11", "sha256:" + "b" * 64, "python3.11", "linux/amd64")
OTHER = "sha256:" + "0" * 64
DIGEST = "sha256:" + "d" * 64


def config_of(tmp_path: Path, services: dict, **settings):
    project = tmp_path / "project"
    project.mkdir(parents=True, exist_ok=True)
    (project / "compose.yaml").write_text(yaml.safe_dump({"services": services}))
    (project / "Dockerfile").write_text("ARG BASE_IMAGE=scratch\nFROM ${BASE_IMAGE}\n")
    config, problems = validate_host("gpu-01", {"stack": str(project), **settings})
    assert problems == []
    return config


PLAIN = {"web": {"image": "nginx:1.27"}}
MODEL = {"repo_id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "a" * 40}


@pytest.mark.parametrize("settings, wanted", [
    ({}, False),  # the neutral defaults
    ({"ml_services": {"web": {"ml_env": True}}}, True),
    ({"ml_services": {"web": {}}}, True),  # ml_env is True unless said otherwise
    ({"ml_services": {"web": {"ml_env": False, "models": ["EMBEDDING_MODEL"]}}, "models": [MODEL],
      "service_models": {"EMBEDDING_MODEL": MODEL["repo_id"]}}, False),  # models without the env
    ({"models": [MODEL]}, False),  # "control" mode: the control node downloads
    ({"models": [MODEL], "model_mode": "host"}, True),  # the hosts download with the env's huggingface_hub
    ({"model_mode": "host"}, False),  # nothing to download
])
def test_the_env_is_wanted_only_when_a_service_mounts_it_or_hosts_download_models_with_it(tmp_path, settings, wanted):
    assert env_wanted(config_of(tmp_path, PLAIN, **settings)) is wanted


def test_the_probe_hashes_no_env_store_when_no_env_is_wanted(tmp_path):
    assert probe_part(config_of(tmp_path, PLAIN, ml_env_verify_hashes=True)).arguments["hash_as"] is None
    wanted = config_of(tmp_path, PLAIN, ml_env_verify_hashes=True, ml_services={"web": {}})
    assert probe_part(wanted).arguments["hash_as"] == (0, 0)


def never_asked() -> RegistryImage:
    raise AssertionError("the builder was asked about an image the host holds")


def test_a_host_holding_the_pinned_id_needs_nothing_and_the_builder_is_not_asked():
    assert plan_base(BASE.id, BASE, "pull", never_asked) == BasePlan("none")
    assert plan_base(BASE.id, BASE, "ship", never_asked) == BasePlan("none")


@pytest.mark.parametrize("host_image", [None, OTHER])  # lacks it, or holds another id under the tag
def test_a_host_without_the_pinned_id_pulls_it_by_the_builders_registry_digest(host_image):
    copy = RegistryImage(BASE.ref, DIGEST, BASE.id, 45_000_000)
    assert plan_base(host_image, BASE, "pull", lambda: copy) == BasePlan(
        "pull", f"registry.corp:5000/ml/python@{DIGEST}", copy)


@pytest.mark.parametrize("host_image", [None, OTHER])
def test_a_host_without_the_pinned_id_is_sent_the_builders_copy_in_ship_mode(host_image):
    copy = RegistryImage(BASE.ref, DIGEST, BASE.id, 45_000_000)
    assert plan_base(host_image, BASE, "ship", lambda: copy) == BasePlan("ship", "", copy)


def test_an_image_no_registry_holds_is_shipped_whatever_image_source_says():
    copy = RegistryImage(BASE.ref, "", BASE.id, 45_000_000)  # built or loaded on the builder: no RepoDigests
    assert plan_base(None, BASE, "pull", lambda: copy).action == "ship"


def test_the_base_archive_is_named_by_the_image_id(tmp_path):
    config = config_of(tmp_path, PLAIN, image_cache_dir=str(tmp_path / "images"))
    assert base_archive(config, BASE) == tmp_path / "images" / f"base-{'b' * 16}.tar.gz"


def test_only_another_platform_is_a_problem_of_the_host_now(tmp_path):
    config = config_of(tmp_path, PLAIN)
    assert host_problem(config, MlEnvState(None, {}, (), 0, "x86_64", None), BASE) is None  # it gets the image
    assert host_problem(config, MlEnvState(None, {}, (), 0, "x86_64", OTHER), BASE) is None
    assert host_problem(config, MlEnvState(None, {}, (), 0, "aarch64", BASE.id), BASE) == (
        "this host is linux/arm64, the env is built for linux/amd64")


def test_with_no_env_the_builder_is_asked_for_the_base_only_by_a_build_that_reads_it(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(fleet_context, "base_image", lambda config, cache, host_image: asked.append(host_image) or BASE)
    fleet = fleet_context.FleetContext()
    plain = config_of(tmp_path / "a", PLAIN)
    assert stack_base(plain, fleet, project_of(plain), OTHER) is None
    own_base = config_of(tmp_path / "b", {"api": {"build": {"context": "."}}, **PLAIN})  # FROM its own default
    assert stack_base(own_base, fleet, project_of(own_base), OTHER) is None
    assert asked == []
    reads = config_of(tmp_path / "c", {"api": {"build": {"context": ".", "args": {
        "BASE_IMAGE": "${MLSTACK_BASE_IMAGE}"}}}})
    assert stack_base(reads, fleet, project_of(reads), OTHER) == BASE
    assert asked == [OTHER]  # the host's copy first: a recorded id needs no builder


def test_with_no_env_the_override_mounts_none_and_the_stack_still_gets_the_base_image_ref(tmp_path):
    config = config_of(tmp_path, {"api": {"build": {"context": ".", "args": {"BASE_IMAGE": "${MLSTACK_BASE_IMAGE}"}}},
                                  **PLAIN}, ml_env_base_image="python:3.11-slim-bookworm")
    project = project_of(config)
    out = render(project, config, NoEnv(None), [], {}, [], {}, "5a17" * 8)
    services = yaml.safe_load(out.override)["services"]
    assert all("volumes" not in service and "environment" not in service for service in services.values())
    assert all("mlstack.env-id" not in service["labels"] for service in services.values())
    assert 'MLSTACK_BASE_IMAGE="python:3.11-slim-bookworm"' in out.dotenv.splitlines()
