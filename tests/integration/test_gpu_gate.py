"""The GPU gate on a real 2-host fleet whose GPUs are fixtures (conftest `gpu_shaped`: an nvidia-smi that
prints real captured lines, and the container toolkit's hook), not GPUs: these are not GPU tests. They
show the gate refusing an env before the switch, the previous env staying active, and the CPU host of
a mixed fleet converging. The rehearsal env carries the real CUDA runtime wheel 13.0.96."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleet_helpers import ENV_DIR, active, envs_on

FILES = Path(__file__).parents[2] / "files"
FIXTURES = Path(__file__).parents[1] / "unit/host/fixtures"
H100 = (FIXTURES / "nvidia-smi-h100.txt").read_text().splitlines()[0]  # the lent H100, driver 580.159.04
# The same card under the R570 driver (CUDA 12.8's): too old for a CUDA 13 env
H100_R570 = H100.replace("580.159.04", "570.124.06")
# A V100 under R580 (the last branch that drives Volta): CUDA 13 has no Volta support
V100 = "0, GPU-2c1a6f0e-5b7d-4c2e-9f3a-8d6e4b1c0a97, Tesla V100-SXM2-32GB, 32768, 580.82.07, 7.0, [N/A]"


@pytest.fixture(scope="module")
def second_env(tmp_path_factory) -> str:
    """Requirements of a second env (the rehearsal set and one more package): a switch to gate."""
    path = tmp_path_factory.mktemp("requirements") / "b.txt"
    path.write_text((FILES / "requirements.rehearsal.txt").read_text() + "packaging\n")
    return str(path)


def deploy(fleet, env_cache, *data: str):
    return fleet.deploy("--data", f"ml_env_cache_dir={env_cache}", *[arg for item in data for arg in ("--data", item)])


def listing(fleet, record, path: str = ENV_DIR) -> str:
    return fleet.ssh(record, f"find {path} -printf '%p %m %s %T@\\n' | sort")


@pytest.fixture()
def on_first_env(fleet, env_cache) -> str:
    """Both hosts wiped, then running the rehearsal env; returns its id."""
    fleet.wipe()
    first = deploy(fleet, env_cache)
    assert first.returncode == 0, first.output[-3000:]
    envs = {active(fleet, record) for record in fleet.hosts}
    assert len(envs) == 1
    return envs.pop()


def message(run, record) -> str:
    return run.report[record.name]["failure"]["message"]


def test_old_driver_and_unsupported_gpu_are_refused_before_the_switch(fleet, env_cache, second_env, on_first_env):
    old_driver, volta = fleet.hosts
    with fleet.gpu_shaped(old_driver, [H100_R570]), fleet.gpu_shaped(volta, [V100]):
        # The second env is not built yet: the checks run at execution, once it is, before it is sent.
        built = deploy(fleet, env_cache, f"ml_env_requirements={second_env}")
        after_build = {record.name: (active(fleet, record), envs_on(fleet, record)) for record in fleet.hosts}
        # Now it is in the control env cache: the checks run at plan time, and nothing changes on either host.
        before = {record.name: listing(fleet, record) for record in fleet.hosts}
        planned = deploy(fleet, env_cache, f"ml_env_requirements={second_env}")
        after = {record.name: listing(fleet, record) for record in fleet.hosts}
    for run in (built, planned):
        assert run.returncode != 0
        assert ("driver 570.124.06 is older than 580.65.06, the minimum for CUDA 13.0: upgrade the driver or pin a "
                "CUDA 12 env") in message(run, old_driver)
        assert ("GPU 0 (Tesla V100-SXM2-32GB) has compute capability 7.0, below 7.5, the lowest CUDA 13.0 supports"
                in message(run, volta))
    for record in fleet.hosts:
        assert after_build[record.name] == (on_first_env, [on_first_env])  # still active; the new one never sent
        assert planned.report[record.name]["failure"]["step"] == "ML env"
        assert planned.report[record.name]["gate"]["result"] == "refused"
    assert after == before  # refused at plan time: not a byte sent, nothing switched


@pytest.mark.heavy
def test_no_container_runtime_is_refused_and_the_cpu_host_of_a_mixed_fleet_converges(fleet, env_cache, second_env,
                                                                                        on_first_env):
    gpu_host, cpu_host = fleet.hosts
    with fleet.gpu_shaped(gpu_host, [H100], hook=False):
        run = deploy(fleet, env_cache, f"ml_env_requirements={second_env}")
    assert run.returncode != 0
    assert "docker cannot give containers GPUs (no nvidia runtime and no CDI spec for nvidia.com/gpu)" in message(
        run, gpu_host)
    assert active(fleet, gpu_host) == on_first_env
    assert run.report[cpu_host.name]["result"] == "ok"
    assert active(fleet, cpu_host) not in ("", on_first_env)  # the CUDA env imports on a CPU host and goes live
    assert run.report[cpu_host.name]["gate"] is None  # no GPU: no gate


@pytest.mark.heavy
def test_a_host_that_passes_the_checks_still_needs_the_smoke_test_in_a_container_given_its_gpus(
        fleet, env_cache, second_env, on_first_env):
    gpu_host, cpu_host = fleet.hosts
    with fleet.gpu_shaped(gpu_host, [H100]):  # the real H100 capture: every plan-time check passes
        run = deploy(fleet, env_cache, f"ml_env_requirements={second_env}")
        envs = envs_on(fleet, gpu_host)
    assert run.returncode != 0
    assert run.report[gpu_host.name]["gate"]["result"] == "checked"
    # No GPU behind the fixtures: docker cannot start the smoke test's container with the GPUs given
    failure = run.report[gpu_host.name]["failure"]
    (new,) = set(envs) - {on_first_env}  # uploaded and unpacked, but not switched to
    assert failure["step"] == f"ML env | Import check, then switch to {new}"
    # the import check passed; the smoke test's container could not be given GPUs
    assert f'[{gpu_host.name}] docker: Error response from daemon: could not select device driver "" with ' \
           'capabilities: [[gpu]]' in run.output
    assert active(fleet, gpu_host) == on_first_env
    assert run.report[cpu_host.name]["result"] == "ok"


@pytest.mark.heavy
def test_a_service_asking_for_more_gpus_than_a_host_has_fails_that_host_before_it_changes(fleet, env_cache,
                                                                                          on_first_env):
    gpu_host, cpu_host = fleet.hosts
    with fleet.gpu_shaped(gpu_host, [H100]):
        before = {record.name: listing(fleet, record, "/srv/mlstack") for record in fleet.hosts}
        run = deploy(fleet, env_cache, f"service_gpus={json.dumps({'reranker': 2})}",
                     f"stack_env={json.dumps({'CHANGED': '1'})}")
        after = {record.name: listing(fleet, record, "/srv/mlstack") for record in fleet.hosts}
    assert run.returncode != 0
    assert message(run, gpu_host) == "service_gpus.reranker = 2: this host has 1 GPU(s)"
    assert message(run, cpu_host) == "service_gpus.reranker = 2: this host has 0 GPU(s)"
    assert after == before  # the .env change was planned, and not made


@pytest.mark.heavy
def test_a_cdi_only_host_with_a_service_given_gpus_fails_before_the_stack_changes(fleet, env_cache, on_first_env):
    gpu_host, cpu_host = fleet.hosts
    # No container toolkit hook, and a CDI spec for nvidia.com/gpu in the host's own /run (a fixture too).
    fleet.ssh(gpu_host, "mkdir -p /run/cdi && printf 'cdiVersion: 0.5.0\\nkind: nvidia.com/gpu\\n' "
                        "> /run/cdi/nvidia.yaml")
    try:
        with fleet.gpu_shaped(gpu_host, [H100], hook=False):
            before = listing(fleet, gpu_host, "/srv/mlstack")
            run = deploy(fleet, env_cache, f"stack_env={json.dumps({'CHANGED': '2'})}")
            after = listing(fleet, gpu_host, "/srv/mlstack")
    finally:
        fleet.ssh(gpu_host, "rm -r /run/cdi")
    assert run.returncode != 0
    assert run.report[gpu_host.name]["docker_gpus"] == "cdi"
    assert message(run, gpu_host).startswith("service_gpus: this host's docker gives containers GPUs through CDI "
                                             "only"), message(run, gpu_host)
    assert after == before
    assert run.report[cpu_host.name]["result"] == "ok"
