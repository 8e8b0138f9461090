"""One rehearsal host: runs as the first process of its own network, mount and UTS namespaces.

Started by `rehearsal.fleet` as `unshare --net --mount --uts --propagation private python -m
rehearsal.host HOST_DIR`. It waits for the veth the control node moves in, gives the host its
address (no default route, and an nftables guard that counts and drops packets for anywhere
outside the fleet), private mounts and hostname, then supervises its dockerd and sshd
until SIGTERM, when it stops both and exits — taking the namespaces with it.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DOCKERD_STOP_TIMEOUT = 30


def wait_for_interface(name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.if_nametoindex(name)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} never appeared in this namespace") from None
            time.sleep(0.05)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True)


def bind(source: Path, target: str) -> None:
    if source.is_dir():
        Path(target).mkdir(parents=True, exist_ok=True)
    run("mount", "--bind", str(source), target)


# Addresses a host's packets may go to: the fleet's subnet, loopback, docker's own networks on the host
# (its default pools), and the link-local multicast and broadcast that never leave a link (IGMP reports
# of a new interface go to 224.0.0.22). Anything else is counted and dropped: tests read the counter. Containers on
# compose networks reach the fleet (its resolver first: docker's embedded DNS forwards from inside the
# container) behind the host's address, as docker's own masquerading would do (its iptables stay off).
EGRESS_GUARD = """table inet fleet_egress {{
    counter outside {{}}
    set inside4 {{ type ipv4_addr; flags interval; elements = {{ {subnet}, 127.0.0.0/8, 172.16.0.0/12,
                                                                192.168.0.0/16, 224.0.0.0/24,
                                                                255.255.255.255 }} }}
    chain guard {{
        ip daddr != @inside4 counter name outside drop
        ip6 daddr != {{ ::1/128, fe80::/10, ff00::/8 }} counter name outside drop
    }}
    chain from_containers {{ type filter hook prerouting priority -300; policy accept; jump guard; }}
    chain from_host {{ type filter hook output priority -300; policy accept; jump guard; }}
    chain behind_host {{ type nat hook postrouting priority 100; policy accept;
                        oifname "eth0" ip saddr != {subnet} masquerade; }}
}}
"""


def setup_network(spec: dict) -> None:
    wait_for_interface("eth0")
    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", f"{spec['ip']}/{spec['prefix']}", "dev", "eth0")
    run("ip", "link", "set", "eth0", "up")
    subnet = ipaddress.ip_interface(f"{spec['ip']}/{spec['prefix']}").network
    subprocess.run(["nft", "-f", "-"], input=EGRESS_GUARD.format(subnet=subnet), text=True, check=True)


def setup_mounts(host_dir: Path) -> None:
    run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run")
    Path("/run/sshd").mkdir(mode=0o755)
    for private, target in (
        ("srv", "/srv"),
        ("docker", "/var/lib/docker"),
        ("root", "/root"),
        ("home", "/home"),
        ("tmp", "/tmp"),
        ("etc/hosts", "/etc/hosts"),
        ("etc/resolv.conf", "/etc/resolv.conf"),
        ("etc/passwd", "/etc/passwd"),
        ("etc/group", "/etc/group"),
        ("etc/shadow", "/etc/shadow"),
        ("etc/sudoers.d", "/etc/sudoers.d"),
    ):
        bind(host_dir / private, target)


def wait_for_docker(socket_path: Path, dockerd: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dockerd.poll() is not None:
            raise SystemExit(f"dockerd exited with {dockerd.returncode}; see dockerd.log")
        if socket_path.exists():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(socket_path))
                probe.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                if b"200 OK" in probe.recv(256):
                    return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.1)
    raise SystemExit("dockerd did not answer within 60s; see dockerd.log")


def start_services(spec: dict, host_dir: Path) -> list[subprocess.Popen]:
    control_socket = host_dir / "docker.sock"
    control_socket.unlink(missing_ok=True)
    dockerd = subprocess.Popen(
        [
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            f"--insecure-registry={spec['registry']}",  # the fleet's registry speaks plain HTTP
            "--data-root=/var/lib/docker",
            "--exec-root=/run/docker",
            "--pidfile=/run/docker.pid",
            "--host=unix:///run/docker.sock",
            f"--host=unix://{control_socket}",
        ],
        stdout=(host_dir / "dockerd.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    wait_for_docker(control_socket, dockerd)
    sshd = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(host_dir / "sshd_config")],
        stdout=(host_dir / "sshd.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    return [sshd, dockerd]


def supervise(services: list[subprocess.Popen], host_dir: Path) -> int:
    stopping = False

    def on_term(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    (host_dir / "ready").write_text(str(time.time()))
    while not stopping and all(service.poll() is None for service in services):
        time.sleep(0.5)
    (host_dir / "ready").unlink(missing_ok=True)
    # sshd first (no new sessions), then dockerd, which stops its containers on the way out.
    for service in services:
        if service.poll() is None:
            service.terminate()
            try:
                service.wait(DOCKERD_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
    return 0 if stopping else 1


def main(host_dir: str) -> int:
    root = Path(host_dir)
    spec = json.loads((root / "spec.json").read_text())
    setup_network(spec)
    socket.sethostname(spec["name"])
    setup_mounts(root)
    return supervise(start_services(spec, root), root)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
