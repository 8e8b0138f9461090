"""Hosts feed hosts (tasks/host/fanout.py) on a 4-host rehearsal fleet: a new env, models and a built image leave
the control node once, the other hosts fetch them from each other through libtorrent swarms, every file is checked
before it enters a store, and after each step no peer, container or listening port is left and nothing left the
fleet."""

from __future__ import annotations

import random
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from fleet_helpers import CACHE, ENV_DIR, active, new_requirements, plain_project, sent_to, wait_until

from rehearsal import hub
from rehearsal.baseimage import IMAGE_NAME
from tasks.control.env_store import read_tree, tree_objects
from tasks.control.swarm_kit import kit_for
from tasks.fleet.runner import run_deploy

HOSTS = 4
PORT = 51871  # fanout_port's default
KITS = "/srv/mlstack/swarm-kit"  # below stack_root's default, root's
COMPOSE_DIR = "/srv/mlstack/compose"  # compose_project_dir's default
BIG = "mlstack-fanout-ballast"
BIG_DATA = random.Random(25).randbytes(40_000_000)  # incompressible: what is sent is what is new
BALLAST_LAYER = 20_000_000
KIND_LINE = re.compile(r"\[(host\d+)\] (ML env|Model|Image) fan-out: ([\d.]+) MB from peers, [\d.]+ MB to peers, "
                       r"(\d+) piece\(s\) rejected; (.*)")
ENV_LINE = re.compile(r"\[(host\d+)\] ML env: (?:none|env-[0-9a-f]{16}) → (env-[0-9a-f]{16})")


@pytest.fixture(scope="module")
def four(fleet, request):
    """The session's fleet grown to four hosts for this module, and back to its two after it unless the session
    ends with it (conftest runs it last; the session's teardown then stops all four at once)."""
    records = fleet.fleet.up(HOSTS)
    fleet.wipe()
    try:
        yield type(fleet)(fleet.fleet, records)
    finally:
        if request.session.items[-1].module is not request.module:
            fleet.wipe()
            fleet.fleet.up(len(fleet.hosts))


def deploy(fleet, cache: Path, *data: str, strace: Path | None = None, dry: bool = False):
    """The env alone on the hosts: a plain project whose one service mounts it, no models, no image to build."""
    light = [f"stack={plain_project(cache.parent)}", 'ml_services={"web": {"ml_env": true}}', "service_gpus={}",
             "models=[]", "service_models={}", "http_checks=[]", f"ml_env_cache_dir={cache}", *data]
    return run(fleet, light, strace, dry)


def deploy_all(fleet, cache: Path, project: Path, *data: str, strace: Path | None = None, dry: bool = False):
    """Every kind a swarm carries: the env, the rehearsal's models (control mode) mounted into a service whose
    image is built once for the fleet and shipped (PROJECT: `built_project`)."""
    kinds = [f"stack={project}", 'ml_services={"web": {"ml_env": true, "models": ["MODEL"]}}', "service_gpus={}",
             f'service_models={{"MODEL": "{hub.MINILM}"}}', "http_checks=[]", f"ml_env_cache_dir={cache}", *data]
    return run(fleet, kinds, strace, dry)


def built_project(tmp_path: Path) -> Path:
    """The plain project with its service built on the runtime image, a layer of BALLAST_LAYER random bytes
    added."""
    project = plain_project(tmp_path)
    compose = yaml.safe_load((project / "compose.yaml").read_text())
    compose["services"]["web"]["build"] = {"context": "./app", "network": "none",
                                           "args": {"BASE_IMAGE": "${MLSTACK_BASE_IMAGE}"}}
    del compose["services"]["web"]["image"]
    (project / "compose.yaml").write_text(yaml.safe_dump(compose, sort_keys=False))
    (project / "app").mkdir(exist_ok=True)
    (project / "app" / "Dockerfile").write_text(  # made in the build: the project's own files stay small
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN python3 -c \"import random; open('/ballast', 'wb').write("
        f"random.Random(27).randbytes({BALLAST_LAYER}))\"\n")
    return project


def run(fleet, data: list[str], strace: Path | None, dry: bool):
    args = [arg for item in data for arg in ("--data", item)]
    tracer = ("strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect,sendto,sendmsg", "-o", str(strace))
    return run_deploy("--dry" if dry else "-y", *args, env={"MLSTACK_FLEET": fleet.fleet.name},
                      wrap=tracer if strace else ())


def control_sent(fleet) -> int:
    """Bytes the control node sent into the fleet: its bridge's own counter (what hosts send each other is
    forwarded by the bridge, never counted on it)."""
    return int(Path(f"/sys/class/net/{fleet.fleet.bridge}/statistics/tx_bytes").read_text())


def outside_packets(fleet, record) -> int:
    return int(re.search(r"packets (\d+)", fleet.ssh(record, "nft list counter inet fleet_egress outside"))[1])


def peer_sockets(fleet, record) -> str:
    """The swarm port's listening and open connections on RECORD (TIME-WAIT, the kernel's memory of a closed
    connection, is neither)."""
    return fleet.ssh(record, f"ss -Htn state listening state established '( sport = :{PORT} or dport = :{PORT} )'")


def addresses_contacted(trace: Path) -> set[str]:
    """Every inet address a traced process connected or sent to."""
    return set(re.findall(r'sin_addr=inet_addr\("([0-9.]+)"\)', trace.read_text()))


def place_kits(fleet, cache: Path) -> None:
    """Each host holds the fan-out's kit, as an earlier fan-out leaves it (the kit goes to a host once; the heavy
    test below and `make bench-fanout` have the deploy place it)."""
    kit = kit_for(cache)
    for record in fleet.hosts:
        with kit.archive.open("rb") as archive:
            subprocess.run([*fleet.fleet.ssh_argv(record), f"mkdir -p {KITS}/{kit.id} && tar -xz -C {KITS}/{kit.id}"],
                           stdin=archive, check=True, timeout=60)


def test_what_is_new_leaves_the_control_node_once_and_every_host_checks_what_its_peers_sent(four, env_cache, tmp_path):
    """The first install of an env, two models and a built image on four hosts, all three kinds through swarms."""
    cache, project = env_cache, built_project(tmp_path)  # the session's env cache: the env is often built already
    place_kits(four, cache)
    plan = deploy_all(four, cache, project, "fanout_min_bytes=0", dry=True)  # builds the env (host1's engine)
    assert plan.returncode == 0 and re.search(r"host\d is sent [\d.]+ MB by the control node and seeds; 3 host\(s\) "
                                              r"fetch [\d.]+ MB between hosts", plan.output), plan.output[-4000:]
    outside = {record.name: outside_packets(four, record) for record in four.hosts}  # earlier modules' probes
    received = {record.name: sent_to(four, record) for record in four.hosts}
    sent_before, trace = control_sent(four), tmp_path / "connects.trace"
    run = deploy_all(four, cache, project, "fanout_min_bytes=0", strace=trace)
    sent = control_sent(four) - sent_before
    assert run.returncode == 0, run.output[-4000:]
    (env,) = {env for _, env in ENV_LINE.findall(run.output)}
    assert all(active(four, record) == env for record in four.hosts)

    # One host was sent each kind's files; the three others fetched them from peers and took each in only once
    # its hash matched: env objects by sha256 name, model blobs by name, the image's archive by its sha256.
    objects = sum(tree_objects(read_tree(cache, env) or {}).values())
    seeds = re.findall(r"\[(host\d)\] (ML env|Model|Image) fan-out: (host\d) is sent", run.output)
    assert {kind for _, kind, _ in seeds} == {"ML env", "Model", "Image"} and "fan-out kit" not in run.output, \
        run.output[-4000:]
    fetched = KIND_LINE.findall(run.output)
    by_kind = {kind: [line for line in fetched if line[1] == kind] for kind in ("ML env", "Model", "Image")}
    # The image: every host holds its base layers (whatever else it holds: host1 is the builder, and this
    # session's first hosts ran other modules' images), so all four are sent the same archive and share a swarm.
    assert [len(by_kind[kind]) for kind in by_kind] == [HOSTS - 1, 2 * (HOSTS - 1), HOSTS - 1], run.output[-6000:]
    assert all(rejected == "0" for *_, rejected, _ in fetched)
    taken = [re.fullmatch(r"(\d+) object\(s\), ([\d.]+) MB, taken into the store from the swarm; 0 dropped", said)
             for *_, said in by_kind["ML env"]]
    assert all(taken) and all(float(match[2]) * 1e6 >= 0.99 * objects for match in taken if match)
    assert all(re.fullmatch(r"\d+ file\(s\), [\d.]+ MB, taken into the cache from the swarm; 0 dropped", said)
               for *_, said in by_kind["Model"])
    assert all(said.startswith("image ") and said.endswith(" loaded from the swarm") for *_, said in by_kind["Image"])
    # What is new, as a host receives it (each host lacked all of it): the control node sent about that once.
    new = min(sent_to(four, record) - received[record.name] for record in four.hosts)
    assert new >= objects + BALLAST_LAYER
    assert sent <= 1.3 * new, f"control node sent {sent} bytes; a host received {new}"

    # The step left nothing behind: no peer container, no listener on the port, nothing staged.
    for record in four.hosts:
        assert four.ssh(record, "docker ps -aq --filter name=mlstack-swarm") == ""
        assert peer_sockets(four, record) == "", record.name
        assert four.ssh(record, f"find {ENV_DIR}/incoming {CACHE} {COMPOSE_DIR} -mindepth 1 -maxdepth 1 "
                                f"\\( -path '{ENV_DIR}/incoming/*' -o -name '.swarm' -o -name '.image-*' \\)") == ""
        assert outside_packets(four, record) == outside[record.name], record.name
    # The control node's deploy talked to fleet addresses and loopback only (its peers run on the hosts).
    subnet = four.fleet.gateway.rsplit(".", 1)[0] + "."
    assert {address for address in addresses_contacted(trace)
            if not address.startswith((subnet, "127."))} == set()


@pytest.mark.heavy
def test_a_peer_killed_mid_swarm_leaves_its_host_to_get_the_rest_directly(four, tmp_path):
    """The peer of one host is killed while it fetches (its link slowed so that the swarm lasts): the run goes on,
    that host is sent directly what it still lacks, and the others finish from their peers. A peer an earlier
    run's lost connection left running on another host (planted: labelled as the deploy labels its peers) is
    gone once that host's peer starts."""
    cache, victim, orphaned = tmp_path / "cache", four.hosts[-1], four.hosts[0]
    assert deploy(four, cache).returncode == 0
    four.ssh(orphaned, f"docker run -d --label mlstack.swarm --name mlstack-swarm-0ld0run0 --network none "
                       f"--entrypoint sleep {IMAGE_NAME} 3600")
    data = random.Random(26).randbytes(len(BIG_DATA))
    done: list = []
    with four.throttled(victim, "40mbit"):
        runner = threading.Thread(target=lambda: done.append(
            deploy(four, cache, "fanout_min_bytes=0", new_requirements(tmp_path, BIG + "-2", data))))
        runner.start()
        wait_until(lambda: four.ssh(victim, "docker ps -q --filter name=mlstack-swarm --filter status=running"),
                   "the victim's peer running", timeout=300)
        time.sleep(2)
        four.ssh(victim, "docker ps -q --filter name=mlstack-swarm | xargs -r docker kill")
        runner.join(timeout=600)
    (run,) = done
    assert run.returncode == 0, run.output[-4000:]
    (new,) = {env for _, env in ENV_LINE.findall(run.output)}
    assert all(active(four, record) == new for record in four.hosts)
    assert re.search(rf"\[{victim.name}\] ML env fan-out: the swarm did not finish", run.output), run.output[-4000:]
    assert re.search(rf"\[{victim.name}\] ML env {new}: \d+ new file\(s\)", run.output)
    for record in four.hosts:
        assert four.ssh(record, "docker ps -aq --filter name=mlstack-swarm") == "", record.name
    assert peer_sockets(four, victim) == ""
