"""A deploy does only what the settings ask, on a real 2-host fleet: with no service using the env nothing of it is
built, sent, checked or mounted (and the builder is not needed at all); with the env wanted, a host that lacks the
runtime base image, or holds another id under its tag, gets the builder's very id before the env's import check
runs there, shipped (the rehearsal's base image is in no registry) or pulled by digest from the fleet registry."""

from __future__ import annotations

import json
import re

import docker
import pytest
from fleet_helpers import ENV_DIR, active, plain_project

from rehearsal import registry
from rehearsal.baseimage import IMAGE_NAME

BASE_LINE = r"\[{host}\] Base image {ref} \(sha256:[0-9a-f]{{12}}…\): {what}"


@pytest.fixture(scope="module", autouse=True)
def clean_hosts(fleet):
    fleet.wipe()
    yield
    fleet.wipe()


def image_id(fleet, record, reference: str = IMAGE_NAME) -> str:
    return fleet.ssh(record, f"docker image inspect -f '{{{{.Id}}}}' {reference} 2>/dev/null || true").strip()


def operation_names(run) -> list[str]:
    return [op["name"] for op in run.operations]


@pytest.mark.heavy  # make test's 15 minutes: the fan-out test took its place (about 53 s with this module's wipe)
def test_with_no_service_using_the_env_nothing_of_it_is_built_sent_checked_or_mounted(fleet, tmp_path):
    env_cache = tmp_path / "env-cache"
    settings = [f"stack={plain_project(tmp_path)}", "ml_services={}", "service_gpus={}", "models=[]",
                "service_models={}", "http_checks=[]", f"ml_env_cache_dir={env_cache}",
                # no engine there: the deploy must not need the builder at all
                "ml_env_builder=unix:///nonexistent/docker.sock"]
    args = [arg for item in settings for arg in ("--data", item)]
    run = fleet.deploy(*args)
    assert run.returncode == 0, run.output[-3000:]
    for record in fleet.hosts:
        assert (f"[{record.name}] ML env: not used by any service (ml_services): nothing built, sent or checked"
                in run.output)
        assert fleet.ssh(record, f"ls -A {ENV_DIR}") == ""  # no store, no envs/, no active link
        assert "ml-env" not in fleet.ssh(record, "cat /srv/mlstack/compose/compose.mlstack.yml")
        assert fleet.ssh(record, "docker ps --filter label=com.docker.compose.project=mlstack-plain "
                                 "--format '{{.Status}}'").startswith("Up")
        record_of = run.report[record.name]
        assert record_of["result"] == "ok" and record_of["env"] is None and record_of["models"] == []
        assert set(record_of["changes"]) <= {"directories", "stack"}, record_of["changes"]
    assert "building" not in run.output and "Base image" not in run.output and "model " not in run.output
    assert not env_cache.exists() or not any(env_cache.iterdir())  # nothing built
    names = operation_names(run)
    assert names and not [name for name in names if re.search(r"ML env|Base image|Models? |env-|Import", name)], names

    again = fleet.deploy(*args)
    assert again.returncode == 0, again.output[-3000:]
    assert again.changed_operations() == []


@pytest.mark.heavy
def test_a_host_without_the_base_image_gets_the_builders_id_before_its_import_check(fleet, tmp_path):
    fleet.wipe()  # no container of an earlier test uses the image any more
    builder, other = fleet.hosts  # the rehearsal's ml_env_builder is the first host's engine
    pinned = image_id(fleet, builder)
    assert pinned.startswith("sha256:")
    fleet.ssh(other, f"docker rmi {IMAGE_NAME}")
    assert image_id(fleet, other) == ""

    dry = fleet.deploy("--dry")
    assert dry.returncode == 0, dry.output[-3000:]
    assert re.search(BASE_LINE.format(host=other.name, ref=IMAGE_NAME, what="ship ") + r".*no registry holds it",
                     dry.output), dry.output[-3000:]
    assert re.search(BASE_LINE.format(host=builder.name, ref=IMAGE_NAME, what=r"on the host \(no change\)"),
                     dry.output)
    assert image_id(fleet, other) == ""  # a dry run changes no host

    run = fleet.deploy()
    assert run.returncode == 0, run.output[-3000:]
    assert image_id(fleet, other) == pinned  # exactly the id the env was built on
    names = operation_names(run)
    shipped = next(index for index, name in enumerate(names) if "Base image" in name and name.endswith(": ship"))
    checked = next(index for index, name in enumerate(names) if "Import check" in name)
    assert shipped < checked  # the image is on the host before the import check runs it
    assert run.operations[shipped]["success"] == [other.name]
    assert set(run.operations[checked]["success"]) == {builder.name, other.name}
    assert active(fleet, other) == run.report[other.name]["env"]["after"]
    assert "base image" in run.report[other.name]["changes"]
    assert "base image" not in run.report[builder.name]["changes"]

    again = fleet.deploy()
    assert again.returncode == 0, again.output[-3000:]
    assert again.changed_operations() == []
    assert re.search(BASE_LINE.format(host=other.name, ref=IMAGE_NAME, what=r"on the host \(no change\)"),
                     again.output)

    # Another image under the tag (the stack's own, built on the base): the host gets the pinned id back.
    stack_image = fleet.ssh(other, "docker images --filter reference=mlstack-reranker -q | head -1").strip()
    fleet.ssh(other, f"docker tag {stack_image} {IMAGE_NAME}")
    assert image_id(fleet, other) != pinned
    retagged = fleet.deploy("--data", "ml_env_check_active=true")
    assert retagged.returncode == 0, retagged.output[-3000:]
    assert re.search(BASE_LINE.format(host=other.name, ref=IMAGE_NAME, what="ship ") + r".*the host holds sha256:",
                     retagged.output)
    assert image_id(fleet, other) == pinned
    assert f"[{other.name}] ML env: the import check of" in retagged.output  # rechecked once the image is back


@pytest.mark.heavy
def test_a_base_image_from_the_registry_is_pulled_by_digest_with_the_registry_login(fleet, tmp_path):
    """The fleet registry's rehearsal/tools:1 (the base plus a file) as the runtime base image: the builder holds it,
    pulled from the registry, so the other host pulls that very digest itself, with the login on stdin."""
    fleet.wipe()
    reference = registry.tools_reference(fleet.fleet.gateway)
    builder, other = fleet.hosts
    login = {"username": registry.USER, "password": registry.password(fleet.fleet.dir)}
    client = docker.DockerClient(base_url=f"unix://{fleet.fleet.host_dir(builder.name) / 'docker.sock'}", timeout=300)
    try:
        pulled = client.images.pull(reference, auth_config=login)
    finally:
        client.close()
    fleet.ssh(other, f"docker rmi -f {reference} >/dev/null 2>&1 || true")
    settings = ["--data", f"ml_env_base_image={reference}", "--data", f"ml_env_cache_dir={tmp_path / 'env-cache'}"]

    run = fleet.deploy(*settings)
    assert run.returncode == 0, run.output[-3000:]
    digest = next(entry for entry in pulled.attrs["RepoDigests"]).partition("@")[2]
    assert re.search(BASE_LINE.format(host=other.name, ref=re.escape(reference), what="pull ")
                     + re.escape(f"{reference.rpartition(':')[0]}@{digest}"), run.output), run.output[-3000:]
    assert image_id(fleet, other, reference) == pulled.id
    assert login["password"] not in run.output + json.dumps(run.payload)
    assert fleet.ssh(other, "ls /run/mlstack-pull.* 2>&1 | grep -c 'No such'") == "1\n"  # the login is gone
    assert active(fleet, other) == run.report[other.name]["env"]["after"]  # the import check passed in it

    again = fleet.deploy(*settings)
    assert again.returncode == 0, again.output[-3000:]
    assert again.changed_operations() == []
