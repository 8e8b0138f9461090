"""What the user's compose project itself declares that a host must provide (tasks/host/declarations.py): its
external volumes and networks, a service's own GPU request, read from compose's own config (the control
node's CLI); the stack probe's listing of a host's names; compose's own message when `up` fails."""

import subprocess
from pathlib import Path

import pytest

from tasks.control.compose_project import ComposeProject, compose_config
from tasks.host.declarations import (
    External,
    GpuAsk,
    declaration_problems,
    declares_externals,
    external_resources,
    gpu_ask_problems,
    gpu_asks,
    read_name,
)
from tasks.host.gpu_checks import Gpu
from tasks.host.stack import StackFact
from tasks.host.stack_health import gate_outcome
from tasks.validation import validate_host

TWO = [Gpu(0, "GPU-5a7f8c3e-1b2d-4e6f-9a8b-0c1d2e3f4a5b", "NVIDIA H100 80GB HBM3", 81559, "580.159.04", "9.0"),
       Gpu(1, "GPU-04e3f7c4-4d05-fe38-482c-5a96411275e4", "NVIDIA H100 80GB HBM3", 81559, "580.159.04", "9.0")]

GPU_SERVICES = """\
services:
  reserved:
    image: x
    deploy:
      resources:
        reservations:
          devices:
            - driver: nvidia
              count: all
              capabilities: [gpu]
  by-capability:
    image: x
    deploy: {resources: {reservations: {devices: [{capabilities: ["gpu", "utility"], device_ids: ["1"]}]}}}
  by-driver:
    image: x
    deploy: {resources: {reservations: {devices: [{driver: nvidia, count: 2, capabilities: [compute]}]}}}
  gpus-all:
    image: x
    gpus: all
  gpus-list:
    image: x
    gpus: [{driver: nvidia, count: 1}]
  runtime:
    image: x
    runtime: nvidia
  other-device:
    image: x
    deploy: {resources: {reservations: {devices: [{driver: tpu, capabilities: [tpu]}], cpus: "1"}}}
  plain:
    image: x
"""


def project(tmp_path: Path, text: str, name: str = "project") -> ComposeProject:
    directory = tmp_path / name  # one directory per project: ComposeProject.load reads each once
    directory.mkdir()
    (directory / "compose.yaml").write_text(text)
    return ComposeProject.load(str(directory))


def test_a_services_own_gpu_request_is_found_wherever_compose_takes_one(tmp_path):
    services = project(tmp_path, GPU_SERVICES).services
    found = {name: gpu_asks(definition) for name, definition in services.items()}
    assert found == {
        "reserved": [GpuAsk("deploy.resources.reservations.devices", "driver nvidia, count all, capabilities gpu")],
        "by-capability": [GpuAsk("deploy.resources.reservations.devices", "device_ids 1, capabilities gpu, utility",
                                 device_ids=("1",))],
        "by-driver": [GpuAsk("deploy.resources.reservations.devices", "driver nvidia, count 2, capabilities compute",
                             count=2)],
        "gpus-all": [GpuAsk("gpus", "count all")],
        "gpus-list": [GpuAsk("gpus", "driver nvidia, count 1", count=1)],
        "runtime": [GpuAsk("runtime", "nvidia")],
        "other-device": [],
        "plain": [],
    }
    assert str(found["reserved"][0]) == ("deploy.resources.reservations.devices: driver nvidia, count all, "
                                         "capabilities gpu")


def test_gpu_requests_as_written_and_odd_values_read_without_failing():
    assert gpu_asks({"gpus": "all"}) == [GpuAsk("gpus", "count all")]
    every = {"deploy": {"resources": {"reservations": {"devices": [{"capabilities": ["gpu"], "count": -1}]}}}}
    assert gpu_asks(every) == [GpuAsk("deploy.resources.reservations.devices", "count all, capabilities gpu")]
    assert gpu_asks({"deploy": {"resources": {"reservations": {"devices": [{"capabilities": ["gpu"],
                                                                           "count": "${N}"}]}}}})[0].count is None
    assert gpu_asks({"deploy": None, "gpus": [], "runtime": "runc"}) == []
    assert gpu_asks({"deploy": {"resources": {"reservations": {"devices": "gpu"}}}}) == []


EXTERNALS = """\
services:
  api:
    image: x
    volumes: [data:/data, scratch:/scratch, /srv/host:/host, "cache:/cache"]
    networks: [corp, own]
  worker:
    image: x
    volumes: [{type: volume, source: data, target: /d}]
  hostnet:
    image: x
    network_mode: host
    volumes: [scratch:/s]
  batch:
    image: x
    profiles: [batch]
    volumes: [archive:/a]
volumes:
  data: {external: true, name: "team-data"}
  scratch: {}
  cache: {external: true}
  archive: {external: true}
  unused: {external: true}
networks:
  corp: {external: true, name: corp-net}
  own: {}
  default: {external: true, name: shared}
"""


def test_the_external_volumes_and_networks_the_active_services_use(tmp_path):
    compose = project(tmp_path, EXTERNALS)
    model = {"services": compose.services, "volumes": compose.volumes, "networks": compose.networks}
    assert external_resources(model, compose.active([])) == [
        External("volume", "cache", ("api",)),
        External("volume", "team-data", ("api", "worker")),  # under its name:, used by two services
        External("network", "corp-net", ("api",)),
        External("network", "shared", ("worker",)),  # `default`, which a service naming no network joins
    ]  # scratch and own are the project's own; archive only for the batch profile; unused by none
    assert [external.name for external in external_resources(model, compose.active(["batch"]))] == [
        "archive", "cache", "team-data", "corp-net", "shared"]
    assert External("volume", "team-data", ()).create == "docker volume create team-data"
    assert External("network", "odd name;x", ()).create == "docker network create 'odd name;x'"
    assert declares_externals(compose)
    assert not declares_externals(project(tmp_path, "services:\n  a:\n    image: x\n    volumes: [v:/v]\n"
                                                    "volumes:\n  v: {}\n", "own"))


def test_a_host_lacking_an_external_volume_or_network_gets_the_command_that_makes_it(tmp_path):
    compose = project(tmp_path, EXTERNALS)
    model = compose_config(compose.directory, compose.files, {})
    problems = declaration_problems(model, compose.active([]), frozenset({"cache", "team-data"}),
                                    frozenset({"host", "none", "shared"}), [], "", ())
    assert problems == ["external network 'corp-net' (used by api) is not on this host: create it with "
                        "`docker network create corp-net`"]
    problems = declaration_problems(model, compose.active([]), frozenset(), frozenset({"corp-net", "shared"}),
                                    [], "", ())
    assert problems == [
        "external volume 'cache' (used by api) is not on this host: create it with `docker volume create cache`",
        "external volume 'team-data' (used by api, worker) is not on this host: create it with "
        "`docker volume create team-data`"]
    # the probe read no names (the project declared no external one): nothing is checked
    assert declaration_problems(model, compose.active([]), None, None, [], "", ()) == []


def test_a_service_asking_for_gpus_on_a_host_that_cannot_give_them(tmp_path):
    reserved = gpu_asks(project(tmp_path, GPU_SERVICES).services["reserved"])
    assert gpu_ask_problems("llm", reserved, [], "", ()) == [
        "service llm asks for GPUs (deploy.resources.reservations.devices: driver nvidia, count all, capabilities "
        "gpu), and this host has none (no nvidia-smi): deploy it to GPU hosts only, or give it a compose profile "
        "this host's stack_profiles leave out"]
    assert gpu_ask_problems("llm", reserved, TWO, "", ("runc",))[0].startswith(
        "service llm asks for GPUs (deploy.resources.reservations.devices: driver nvidia, count all, capabilities "
        "gpu), and this host's docker cannot give containers GPUs (no nvidia runtime and no CDI spec for "
        "nvidia.com/gpu): install the NVIDIA Container Toolkit and run `nvidia-ctk runtime configure")
    assert "through CDI only" in gpu_ask_problems("llm", reserved, TWO, "cdi", ())[0]
    assert gpu_ask_problems("llm", reserved, TWO, "runtime", ("runc",)) == []  # the hook: docker's nvidia driver


@pytest.mark.parametrize(("ask", "runtimes", "problem"), [
    (GpuAsk("runtime", "nvidia"), ("runc", "io.containerd.runc.v2"),
     "service llm asks for runtime: nvidia, and this host's docker has no runtime named nvidia (its runtimes: runc, "
     "io.containerd.runc.v2): run `nvidia-ctk runtime configure --runtime=docker` on it and restart docker"),
    (GpuAsk("runtime", "nvidia"), ("nvidia", "runc"), None),
    (GpuAsk("gpus", "driver nvidia, count 3", count=3), ("nvidia",),
     "service llm asks for 3 GPU(s) (gpus: driver nvidia, count 3), and this host has 2"),
    (GpuAsk("gpus", "driver nvidia, count 2", count=2), ("nvidia",), None),
    (GpuAsk("gpus", "device_ids 0, 2", device_ids=("0", "2")), ("nvidia",),
     "service llm asks for GPU 2 (gpus: device_ids 0, 2), and this host has no such GPU (its GPUs: 0, 1)"),
    (GpuAsk("gpus", "device_ids GPU-x", device_ids=("GPU-00000000-0000-0000-0000-000000000000",)), ("nvidia",),
     "service llm asks for GPU GPU-00000000-0000-0000-0000-000000000000 (gpus: device_ids GPU-x), and this host "
     "has no such GPU (its GPUs: 0, 1)"),
    (GpuAsk("gpus", "device_ids", device_ids=(TWO[1].uuid, "1")), ("nvidia",), None),
])
def test_a_gpu_host_meets_what_a_service_asks_for_or_is_told_why_not(ask, runtimes, problem):
    assert gpu_ask_problems("llm", [ask], TWO, "runtime", runtimes) == ([problem] if problem else [])


def test_service_gpus_for_a_service_asking_for_gpus_itself_is_refused_while_validating(tmp_path):
    directory = project(tmp_path, GPU_SERVICES).directory
    _, problems = validate_host("gpu-01", {"stack": str(directory), "service_gpus": {"reserved": "all", "plain": 1}})
    assert problems == ["gpu-01: service_gpus.reserved = 'all': no entry for reserved: its compose definition asks "
                        "for GPUs itself (deploy.resources.reservations.devices: driver nvidia, count all, "
                        "capabilities gpu); keep one of the two"]


def test_the_probe_lists_names_only_when_asked_and_they_are_read_defensively(tmp_path):
    docker = tmp_path / "docker"  # as docker answers with the probe's --format: `volume {{json .Name}}`, ...
    docker.write_text('#!/bin/sh\ncase "$1 $2" in\n'
                      "  'volume ls') printf 'volume %s\\n' '\"team-data\"' '\"we\\u0000ird\\n\"' 'not-json' '42' ;;\n"
                      "  'network ls') printf 'network %s\\n' '\"host\"' '\"\\u00ff-net\"' ;;\n"
                      "  'ps -a') echo 'volume \"posing\"' ;;\n"  # as a container's label with a newline could
                      "esac\n")
    docker.chmod(0o755)
    (tmp_path / "compose").mkdir()
    (tmp_path / "compose" / "compose.yaml").write_text('volume "planted"\n')

    def probe(externals: bool):
        command = StackFact().command(str(tmp_path / "compose"), "p", ["compose.yaml"], externals)
        result = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, check=True,
                                env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
        return StackFact().process(result.stdout.splitlines())

    state = probe(True)
    # JSON strings only, in the leading block only (no later record, no file line); odd characters as docker
    # escaped them
    assert state.volumes == frozenset({"team-data", "we\0ird\n"})
    assert state.networks == frozenset({"host", "\xff-net"})
    assert state.texts == {"compose.yaml": 'volume "planted"\n'}
    unlisted = probe(False)
    assert (unlisted.volumes, unlisted.networks) == (None, None)
    assert StackFact().process(["externals", "externals-end"]).volumes == frozenset()  # none there: listed, empty
    assert StackFact().process(["externals", 'volume "cut"']).volumes is None  # a listing cut short: not read


@pytest.mark.parametrize(("line", "name"), [
    ('volume "data"', "data"), ('volume "a b"', "a b"), ("volume data", None), ("volume 7", None),
    ('volume ""', None), ('volume ["x"]', None), ('network "x"', None), ('volume "\\ud800"', "\ud800"),
])
def test_a_name_line_is_a_json_string_or_nothing(line, name):
    assert read_name(line, "volume") == name


def test_when_compose_up_itself_fails_its_own_message_is_the_failure():
    records = ["up-failed Error response from daemon: no such image: nosuch:1: No such image: nosuch:1",
               "failing api", "failing other-project-service", "up-failed \x1b[31mred\x1b[0m"]
    unhealthy, message = gate_outcome("p", 240, ["api", "db"], records)
    assert unhealthy == ["api"]
    assert message == ("stack p: docker compose up failed: Error response from daemon: no such image: nosuch:1: "
                       "No such image: nosuch:1 / \\x1b[31mred\\x1b[0m")
    assert gate_outcome("p", 240, ["api"], ["failing api"]) == (["api"], "stack p: not healthy within 240s: api")
    assert gate_outcome("p", 240, ["api"], []) == ([], "stack p: not healthy within 240s: see the log")
