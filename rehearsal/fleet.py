"""The rehearsal fleet: N real hosts on this machine, each with its own sshd and docker engine.

Every host is a set of namespaces (network, mount, UTS) led by a `rehearsal.host` supervisor. The
fleet owns one bridge with its own /24 and nothing else on the machine; its state lives under
`STATE_ROOT/<fleet>/` (keys, known_hosts, fleet.json, one directory per host).

`up` is idempotent and self-healing: hosts whose supervisor is gone (a killed session, a reboot)
are wiped and booted again; `down` stops every process by pid, removes the bridge and the state.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from rehearsal import hub, index, registry, resolver
from rehearsal.baseimage import IMAGE_NAME

STATE_ROOT = Path(os.environ.get("MLSTACK_FLEET_STATE", "/var/lib/mlstack-rehearsal/fleets"))
DEFAULT_FLEET = "rehearsal"
SUDO_USER = "deploy"
SUDO_UID = 1100  # not 1000: the deploy must cope with container uids that have no passwd entry
MAX_HOSTS = 200
FLEET_NAME = re.compile(r"^[a-z][a-z0-9]{0,8}$")


class FleetError(Exception):
    pass


@dataclass
class HostRecord:
    name: str
    ip: str
    pid: int
    starttime: str
    netns: int


@dataclass
class ServiceRecord:
    name: str
    url: str
    pid: int
    starttime: str


def fleet_name() -> str:
    return os.environ.get("MLSTACK_FLEET", DEFAULT_FLEET)


def subnet_index(name: str) -> int:
    return 20 + zlib.crc32(name.encode()) % 200


class Fleet:
    def __init__(self, name: str | None = None, state_root: Path = STATE_ROOT):
        self.name = name or fleet_name()
        if not FLEET_NAME.match(self.name):
            raise FleetError(f"fleet name {self.name!r}: expected 1-9 lowercase letters/digits, starting with a letter")
        self.dir = state_root / self.name
        self.index = subnet_index(self.name)
        self.bridge = f"mls-{self.name}"
        self.gateway = f"10.213.{self.index}.1"
        self.prefix = 24
        self.key = self.dir / "id_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.state_file = self.dir / "fleet.json"

    # -- state -------------------------------------------------------------------------------

    def host_ip(self, number: int) -> str:
        return f"10.213.{self.index}.{10 + number}"

    def ssh_argv(self, record: HostRecord, user: str = "root") -> list[str]:
        """OpenSSH to a fleet host with the fleet's key and strict host-key checking."""
        return [
            "ssh", "-i", str(self.key), "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", f"{user}@{record.ip}",
        ]

    def host_dir(self, name: str) -> Path:
        return self.dir / "hosts" / name

    def veth(self, number: int) -> str:
        return f"mls{self.index}h{number}"

    def records(self) -> list[HostRecord]:
        if not self.state_file.exists():
            return []
        return [HostRecord(**record) for record in json.loads(self.state_file.read_text())["hosts"]]

    def services(self) -> dict[str, ServiceRecord]:
        """Control-node services of the fleet (the package index, resolver, registry, HF hub), by name."""
        if not self.state_file.exists():
            return {}
        services = json.loads(self.state_file.read_text()).get("services", {})
        return {name: ServiceRecord(**record) for name, record in services.items()}

    def save(self, records: list[HostRecord], services: dict[str, ServiceRecord]) -> None:
        payload = {
            "name": self.name,
            "gateway": self.gateway,
            "hosts": [asdict(r) for r in records],
            "services": {name: asdict(r) for name, r in services.items()},
        }
        partial = self.state_file.with_suffix(".partial")
        partial.write_text(json.dumps(payload, indent=2))
        partial.rename(self.state_file)

    def live_records(self) -> list[HostRecord]:
        return [record for record in self.records() if is_alive(record)]

    @contextmanager
    def locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir.parent / f".{self.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- up ----------------------------------------------------------------------------------

    def up(self, count: int) -> list[HostRecord]:
        if not 1 <= count <= MAX_HOSTS:
            raise FleetError(f"N={count}: expected a host count from 1 to {MAX_HOSTS}")
        from rehearsal.baseimage import ensure_archive  # debootstrap only when booting

        with self.locked():
            known = self.records()
            live = {record.name: record for record in known if is_alive(record)}
            # stale: reap what is left of them and boot them again
            self.stop_hosts([record for record in known if record.name not in live])
            if not live:
                for service in self.services().values():
                    stop_process(service)
                self._remove_everything()
            self.dir.mkdir(parents=True, exist_ok=True)
            self._ensure_bridge()
            self._ensure_client_key()
            wanted = [f"host{number}" for number in range(1, count + 1)]
            self.stop_hosts([live.pop(extra) for extra in sorted(set(live) - set(wanted))])
            missing = [name for name in wanted if name not in live]
            if missing:
                archive = ensure_archive()
                started = time.monotonic()
                booted = self._boot_hosts(missing, archive)
                live.update({record.name: record for record in booted})
                print(f"fleet {self.name}: booted {len(missing)} host(s) in {time.monotonic() - started:.1f}s",
                      flush=True)
            records = [live[name] for name in wanted]
            self._write_known_hosts(records)
            self._write_etc_hosts(records)
            self.save(records, self.services())
            self._ensure_services(records)
            return records

    def _ensure_services(self, records: list[HostRecord]) -> None:
        """Start the control-node services that are not running; each is recorded as soon as it runs."""
        services = self.services()
        if not _running(services, "index"):
            index.add_to_wheelhouse(index.REHEARSAL_REQUIREMENTS)
            process = index.start(self.gateway, self.dir / "index.log")
            services["index"] = ServiceRecord("index", self.index_url, process.pid, process_starttime(process.pid))
            self.save(records, services)
        if not _running(services, "resolver"):
            process = resolver.start(self.gateway, self.resolver_names, self.resolver_log)
            services["resolver"] = ServiceRecord("resolver", f"dns://{self.gateway}", process.pid,
                                                 process_starttime(process.pid))
            self.save(records, services)
        if not _running(services, "registry"):
            process = registry.start(self.gateway, self.dir)
            services["registry"] = ServiceRecord("registry", f"http://{registry.address_of(self.gateway)}",
                                                 process.pid, process_starttime(process.pid))
            self.save(records, services)
        if not registry.has_tools(self.gateway, self.dir):
            registry.seed(self.gateway, self.dir, self.host_dir(records[0].name) / "docker.sock", IMAGE_NAME)
        if not _running(services, "hub"):
            try:
                process = hub.start(self.gateway, self.dir, hub.ensure_repos())
            except hub.HubError as error:
                raise FleetError(str(error)) from error
            services["hub"] = ServiceRecord("hub", self.hub_url, process.pid, process_starttime(process.pid))
            self.save(records, services)

    @property
    def resolver_names(self) -> Path:
        return self.dir / "resolver-names.json"

    @property
    def resolver_log(self) -> Path:
        """One `query NAME type N: ANSWER` line per query the fleet's hosts and containers made."""
        return self.dir / "resolver.log"

    @property
    def index_url(self) -> str:
        return index.index_url(self.gateway)

    @property
    def hub_url(self) -> str:
        """The fleet's HuggingFace endpoint (olah, offline): HF_ENDPOINT for the control node and the hosts."""
        return hub.hub_url(self.gateway)

    def _boot_hosts(self, names: list[str], archive: Path) -> list[HostRecord]:
        records = []
        for name in names:
            number = int(name.removeprefix("host"))
            self._prepare_host_dir(name, self.host_ip(number))
            records.append(self._spawn(name, number))
        for record in records:
            self._wait_ready(record)
            print(f"  {record.name}: sshd on {record.ip}, dockerd ready", flush=True)

        def load(record: HostRecord) -> None:
            self._load_image(record, archive)
            print(f"  {record.name}: base image loaded", flush=True)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(load, records))
        return records

    def _ensure_bridge(self) -> None:
        if subprocess.run(["ip", "link", "show", self.bridge], capture_output=True).returncode != 0:
            self._check_subnet_free()
            run("ip", "link", "add", self.bridge, "type", "bridge")
            run("ip", "addr", "add", f"{self.gateway}/{self.prefix}", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")

    def _check_subnet_free(self) -> None:
        subnet = f"10.213.{self.index}.0/{self.prefix}"
        routes = subprocess.run(["ip", "-4", "route", "show", subnet], capture_output=True, text=True).stdout
        if routes.strip():
            raise FleetError(f"fleet {self.name}: subnet {subnet} is already routed here ({routes.strip()}); "
                             "pick another fleet name")

    def _ensure_client_key(self) -> None:
        if not self.key.exists():
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"mlstack-fleet-{self.name}", "-f", str(self.key))

    def _prepare_host_dir(self, name: str, ip: str) -> None:
        host_dir = self.host_dir(name)
        if host_dir.exists():
            shutil.rmtree(host_dir)
        for sub in ("srv", "docker", "home", "etc/sudoers.d"):
            (host_dir / sub).mkdir(parents=True)
        (host_dir / "root").mkdir(mode=0o700)
        (host_dir / "tmp").mkdir()
        (host_dir / "tmp").chmod(0o1777)
        (host_dir / "spec.json").write_text(json.dumps({"name": name, "ip": ip, "prefix": self.prefix,
                                                        "registry": registry.address_of(self.gateway)}))
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(host_dir / "ssh_host_ed25519_key"))
        (host_dir / "sshd_config").write_text(sshd_config(ip, host_dir))
        write_accounts(host_dir / "etc")
        (host_dir / "etc/resolv.conf").write_text("# rehearsal host: the fleet's resolver (rehearsal/resolver.py)\n"
                                                  f"nameserver {self.gateway}\noptions timeout:1 attempts:1\n")
        (host_dir / "etc/hosts").write_text("")
        public_key = self.key.with_suffix(".pub").read_text()
        install_home(host_dir / "root", public_key, uid=0)
        install_home(host_dir / "home" / SUDO_USER, public_key, uid=SUDO_UID)

    def _spawn(self, name: str, number: int) -> HostRecord:
        host_dir = self.host_dir(name)
        log = (host_dir / "boot.log").open("ab")
        process = subprocess.Popen(
            ["unshare", "--net", "--mount", "--uts", "--propagation", "private",
             sys.executable, "-m", "rehearsal.host", str(host_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while netns_inode(process.pid) == netns_inode(os.getpid()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise FleetError(f"{name}: unshare failed; see {host_dir / 'boot.log'}")
            time.sleep(0.01)
        veth = self.veth(number)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)  # a leftover from a crash
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(process.pid))
        run("ip", "link", "set", veth, "master", self.bridge, "up")
        return HostRecord(name, self.host_ip(number), process.pid, process_starttime(process.pid),
                          netns_inode(process.pid))

    def _wait_ready(self, record: HostRecord, timeout: float = 90) -> None:
        host_dir = self.host_dir(record.name)
        deadline = time.monotonic() + timeout
        while not (host_dir / "ready").exists():
            if not is_alive(record) or time.monotonic() > deadline:
                raise FleetError(f"{record.name} did not come up; see {host_dir}/boot.log and dockerd.log")
            time.sleep(0.1)
        while True:
            try:
                socket.create_connection((record.ip, 22), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise FleetError(
                        f"{record.name}: sshd not listening on {record.ip}:22; see {host_dir}/sshd.log") from None
                time.sleep(0.1)

    def _load_image(self, record: HostRecord, archive: Path) -> None:
        import docker  # the venv's SDK; prereqs run without it

        client = docker.DockerClient(base_url=f"unix://{self.host_dir(record.name) / 'docker.sock'}", timeout=300)
        with archive.open("rb") as data:
            client.images.load(data)
        client.close()

    def _write_known_hosts(self, records: list[HostRecord]) -> None:
        lines = []
        for record in records:
            key_type, key = (self.host_dir(record.name) / "ssh_host_ed25519_key.pub").read_text().split()[:2]
            lines.append(f"{record.ip} {key_type} {key}\n")
        self.known_hosts.write_text("".join(lines))

    def _write_etc_hosts(self, records: list[HostRecord]) -> None:
        table = "127.0.0.1 localhost\n" + f"{self.gateway} control\n"
        table += "".join(f"{record.ip} {record.name}\n" for record in records)
        self.resolver_names.write_text(json.dumps({"control": self.gateway, **{r.name: r.ip for r in records}}))
        for record in records:
            # In place, not by rename: the file is bind-mounted inside the running host.
            with (self.host_dir(record.name) / "etc/hosts").open("w") as hosts:
                hosts.write(table)

    # -- down --------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop and remove everything of this fleet; return what could not be removed."""
        with self.locked():
            self.stop_hosts(self.records())
            _side_by_side(stop_process, list(self.services().values()))
            self._remove_everything()
        return self.leftovers()

    def stop_hosts(self, records: list[HostRecord]) -> None:
        """Stop RECORDS side by side: a host's dockerd takes seconds to stop its containers and the rest
        is removing its files, so one after the other the waits add up (2 hosts: 29 s of the test session)."""
        _side_by_side(self._stop_host, records)

    def _stop_host(self, record: HostRecord) -> None:
        stop_process(record)
        for pid in self.host_pids(record):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.host_dir(record.name), ignore_errors=True)

    def host_pids(self, record: HostRecord) -> list[int]:
        """Processes still running inside RECORD's host: its network namespace AND its private mounts.

        Both, because a namespace inode can be reused once the namespace is gone: only a process
        that also sees this host's bind mounts was started inside this host, by us.
        """
        marker = f" {self.host_dir(record.name)}/"
        pids = []
        for pid in pids_in_netns(record.netns):
            try:
                if marker in Path(f"/proc/{pid}/mountinfo").read_text():
                    pids.append(pid)
            except OSError:  # exited meanwhile
                continue
        return pids

    def _remove_everything(self) -> None:
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for link in veths_of(self.index):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        found = []
        if subprocess.run(["ip", "link", "show", self.bridge], capture_output=True).returncode == 0:
            found.append(f"interface {self.bridge}")
        found += [f"interface {link}" for link in veths_of(self.index)]
        if self.dir.exists():
            found.append(f"directory {self.dir}")
        found += [f"mount {line}" for line in mounts_under(self.dir)]
        return found


# -- helpers ---------------------------------------------------------------------------------


def run(*argv: str) -> None:
    subprocess.run(argv, check=True)


def _side_by_side(stop, records: list) -> None:
    """STOP(record) for every record at once (each mostly waits for its process to go)."""
    if records:
        with ThreadPoolExecutor(max_workers=min(len(records), 32)) as pool:
            list(pool.map(stop, records))


def process_starttime(pid: int) -> str:
    """The start time of a running pid ("" once it has exited, zombies included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


def stop_process(record: HostRecord | ServiceRecord, timeout: float = 45) -> None:
    """SIGTERM the recorded pid (if it is still that process) and wait for it to go."""
    if is_alive(record):
        os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_alive(record) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_alive(record):
            os.kill(record.pid, signal.SIGKILL)


def _running(services: dict[str, ServiceRecord], name: str) -> bool:
    return name in services and is_alive(services[name])


def is_alive(record: HostRecord | ServiceRecord) -> bool:
    """The recorded process still runs (and its pid was not reused by another process)."""
    return process_starttime(record.pid) == record.starttime


def netns_inode(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:  # gone, or not ours to inspect (pid 1 of the sandbox)
        return 0


def pids_in_netns(inode: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and netns_inode(int(entry.name)) == inode:
            pids.append(int(entry.name))
    return pids


def veths_of(index: int) -> list[str]:
    output = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return re.findall(rf"^\d+: (mls{index}h\d+)[@:]", output, flags=re.M)


def mounted_below(mountinfo_line: str, prefix: str) -> bool:
    """Whether a line of /proc/<pid>/mountinfo names a mount at PREFIX or below it (its root or mount point)."""
    return f" {prefix}/" in mountinfo_line or f" {prefix} " in mountinfo_line


def mounts_under(path: Path) -> list[str]:
    """Mounts at PATH or below it, in any process's view (fleet "fan" is not below fleet "fanb")."""
    prefix = str(path).rstrip("/")
    found = []
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            lines = mountinfo.read_text().splitlines()
        except OSError:  # gone meanwhile, or not readable in this sandbox
            continue
        found += [line for line in lines if mounted_below(line, prefix)]
    return sorted(set(found))


def sshd_config(ip: str, host_dir: Path) -> str:
    return f"""ListenAddress {ip}
HostKey {host_dir / 'ssh_host_ed25519_key'}
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
AuthorizedKeysFile .ssh/authorized_keys
MaxSessions 64
MaxStartups 64:30:128
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def write_accounts(etc: Path) -> None:
    """Per-host passwd/group/shadow: the system accounts plus the sudo user, and no uid 1000."""
    def system(path: str) -> list[list[str]]:
        rows = [line.split(":") for line in Path(path).read_text().splitlines() if line]
        return [row for row in rows if int(row[2]) < 1000 or int(row[2]) == 65534]

    users = system("/etc/passwd") + [[SUDO_USER, "x", str(SUDO_UID), str(SUDO_UID), "", f"/home/{SUDO_USER}",
                                      "/bin/bash"]]
    groups = system("/etc/group") + [[SUDO_USER, "x", str(SUDO_UID), ""]]
    (etc / "passwd").write_text("".join(":".join(row) + "\n" for row in users))
    (etc / "group").write_text("".join(":".join(row) + "\n" for row in groups))
    # "*": no password, but not locked (sshd refuses key logins to locked accounts without PAM).
    (etc / "shadow").write_text("".join(f"{row[0]}:*:19000:0:99999:7:::\n" for row in users))
    (etc / "shadow").chmod(0o640)
    sudoers = etc / "sudoers.d" / SUDO_USER
    sudoers.write_text(f"{SUDO_USER} ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)


def install_home(home: Path, public_key: str, uid: int) -> None:
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(public_key)
    (ssh_dir / "authorized_keys").chmod(0o600)
    shutil.copy("/etc/skel/.bashrc", home / ".bashrc")
    shutil.copy("/etc/skel/.profile", home / ".profile")
    home.chmod(0o700)
    for path in (home, ssh_dir, ssh_dir / "authorized_keys", home / ".bashrc", home / ".profile"):
        os.chown(path, uid, uid)
