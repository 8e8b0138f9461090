"""The rehearsal fleet itself: isolated real hosts, idempotent growth, stale recovery, clean teardown."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from rehearsal.baseimage import archive_path, image_id_of
from rehearsal.fleet import Fleet, is_alive, pids_in_netns


def test_each_host_is_isolated_with_its_own_engine_and_identity(fleet):
    seen_keys, seen_hostnames = set(), set()
    base_id = "sha256:" + image_id_of(archive_path())
    for record in fleet.hosts:
        report = fleet.ssh(record, "hostname; ip -4 route | tr '\\n' ' ';"
                                   " echo;"
                                   " docker network ls --format '{{.Name}}' | sort | tr '\\n' ' ';"
                                   " echo; docker image inspect -f '{{.Id}}' mlstack-base:bookworm;"
                                   " docker compose version --short;"
                                   " findmnt -no TARGET /var/lib/docker")
        hostname, route, networks, image_id, compose, mountpoint = report.splitlines()
        assert hostname == record.name
        # the fleet's /24 on eth0, and the compose networks' own bridges once a stack runs: no default route
        assert "default" not in route and f"{fleet.fleet.gateway.rsplit('.', 1)[0]}.0/24 dev eth0" in route
        assert "bridge" not in networks.split()  # dockerd --bridge=none
        assert image_id == base_id  # the same image id on every host
        assert compose.startswith("2.")
        assert mountpoint == "/var/lib/docker"
        # Nothing outside the fleet is routable: the kernel refuses before any packet leaves.
        unreachable = fleet.ssh(record, "ip route get 192.0.2.1 2>&1; getent hosts example.org || echo no-dns")
        assert "unreachable" in unreachable and "no-dns" in unreachable
        seen_hostnames.add(hostname)
        seen_keys.add((fleet.fleet.host_dir(record.name) / "ssh_host_ed25519_key.pub").read_text().split()[1])
    assert len(seen_keys) == len(seen_hostnames) == len(fleet.hosts)
    known = fleet.fleet.known_hosts.read_text().splitlines()
    assert sorted(line.split()[0] for line in known) == sorted(record.ip for record in fleet.hosts)


def kill_like_a_finished_session(fleet, record) -> None:
    """What CI does to a session's leftovers: every process ended, nothing cleaned up."""
    pids = fleet.host_pids(record)
    assert record.pid in pids  # the supervisor sees its own bind mounts: identity check works
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids_in_netns(record.netns) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.heavy
def test_up_is_idempotent_grows_recovers_from_a_dead_fleet_and_down_leaves_nothing():
    fleet = Fleet("ilife")
    try:
        (one,) = fleet.up(1)
        (again,) = fleet.up(1)
        assert again == one  # same N: nothing rebooted

        grown = fleet.up(2)
        assert grown[0] == one and grown[1].name == "host2"

        for record in grown:
            kill_like_a_finished_session(fleet, record)
        assert fleet.live_records() == []
        assert (fleet.dir / "hosts/host1/docker").exists()  # stale state the next `up` must cope with

        recovered = fleet.up(2)
        assert [r.name for r in recovered] == ["host1", "host2"]
        assert all(r.pid not in (one.pid, grown[1].pid) for r in recovered)
        for record in recovered:
            assert subprocess.run([*fleet.ssh_argv(record), "true"], timeout=30).returncode == 0
    finally:
        records = fleet.records()
        services = fleet.services()
        leftovers = fleet.down()
    assert leftovers == []
    for record in records:
        assert pids_in_netns(record.netns) == []
    assert set(services) == {"index", "resolver", "registry", "hub"}
    for service in services.values():
        assert not is_alive(service)
        assert running_in_group(service.pid) == []  # nor anything it started (olah's git cat-file helpers)
    assert not fleet.dir.exists()


def running_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group PGID: each service leads its own session."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def test_hosts_reach_the_fleet_package_index_and_nothing_beyond_it(fleet):
    record = fleet.hosts[0]
    listing = fleet.ssh(record, "curl -sf http://control:3141/simple/tokenizers/")
    assert "tokenizers-" in listing and ".whl" in listing
    # Unknown projects are not redirected to PyPI (fallback disabled).
    status = fleet.ssh(record, "curl -s -o /dev/null -w '%{http_code}' http://control:3141/simple/no-such-project/",
                       check=False)
    assert status == "404"


def outside_packets(fleet, record) -> int:
    """Packets the host's egress guard counted (and dropped) for addresses outside the fleet."""
    return int(re.search(r"packets (\d+)", fleet.ssh(record, "nft list counter inet fleet_egress outside"))[1])


def test_compose_networks_resolve_inside_the_fleet_and_nothing_leaves_it(fleet):
    """A compose project network on a host: service names resolve, a published port answers the control
    node, other names go to the fleet's resolver (never a public one), and a packet for an outside
    address is counted and dropped on the host."""
    record = fleet.hosts[0]
    compose = ("services:\n"
               "  web: {image: mlstack-base:bookworm, command: [python3, -m, http.server, '8000'],\n"
               "        ports: ['8000:8000'], networks: [app]}\n"
               "networks: {app: {driver: bridge}}\n")
    project = "-p nettest --project-directory /srv/nettest"
    fleet.ssh(record, f"mkdir -p /srv/nettest && printf %s {shlex.quote(compose)} > /srv/nettest/compose.yaml"
                      f" && docker compose {project} up -d --quiet-pull 2>/dev/null")
    try:
        before = outside_packets(fleet, record)
        lookup = ("import socket\nfor name in ('web', 'control', 'example.org'):\n"
                  "    try: print(name, socket.gethostbyname(name))\n"
                  "    except OSError as error: print(name, 'unresolved', error.errno)\n")
        answers = fleet.ssh(record, f"docker compose {project} exec -T web python3 -c {shlex.quote(lookup)}")
        assert answers.splitlines()[1:] == [f"control {fleet.fleet.gateway}", "example.org unresolved -2"]
        assert re.match(r"web 172\.\d+\.\d+\.\d+$", answers.splitlines()[0])
        assert "query example.org type 1: NXDOMAIN" in fleet.fleet.resolver_log.read_text()
        assert outside_packets(fleet, record) == before  # the fleet's resolver answered: nothing left the host
        with urllib.request.urlopen(f"http://{record.ip}:8000/", timeout=10) as response:  # docker's userland proxy
            assert response.status == 200
        attempt = "import socket; s = socket.socket(); s.settimeout(3); print(s.connect_ex(('1.1.1.1', 80)))"
        fleet.ssh(record, f"docker compose {project} exec -T web python3 -c {shlex.quote(attempt)}")
        assert outside_packets(fleet, record) > before
    finally:
        fleet.ssh(record, f"docker compose {project} down -t 1 2>/dev/null; rm -rf /srv/nettest")
