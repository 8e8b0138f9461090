"""Hosts feed hosts: a new env's objects leave the control node once, whatever the size of the fleet.

Where `fanout` is "auto" and at least `fanout_min_hosts` hosts of one run need objects of the same new env
(together at least `fanout_min_bytes`), the env's upload step (tasks/host/ml_env.py `EnvUpload`, one
operation that runs on those hosts side by side) goes like this:

1. the host that lacks least (the seed) is sent what it lacks directly, as on the direct path, checked there;
2. the control node makes a torrent of the objects the others lack (tasks/control/swarm.py: piece hashes,
   no tracker, private); every one of those hosts runs a peer (`files/host/swarm_peer.py`, libtorrent from a
   kit the deploy placed on the host) in a container of the runtime base image on the host's network, as the
   env dir's owner: the seed serves its store read-only, the others fetch from it and from each other into
   `incoming/<mark>`. The peers know only each other's fleet addresses (`fanout_address`); no tracker, DHT,
   local discovery, UPnP or NAT-PMP, switched off in the settings the session is made with;
3. each host checks every object it fetched against its sha256 before it enters its store
   (`env_store.sh adopt`); the engine's piece hashes are the first line, this the second;
4. the step's peers are gone when it ends (their containers removed, however they ended), and each host is
   sent directly whatever its store still lacks, as on the direct path: a host that could not reach its peers
   or ran out of time is complete all the same, and the run says so.

A dry run shows the plan: which host seeds, and the bytes from the control node against those between hosts.
"""

from __future__ import annotations

import ipaddress
import platform
import shlex
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import StringCommand

from ..config import HostConfig
from ..control.builder import BaseImage
from ..control.swarm import SwarmResult, make_torrent, parse_result
from ..control.swarm_kit import Kit, kit_for
from . import deadline
from .channel import open_channel
from .programs import program
from .transfer import RUN_MARK, StreamedUpload, as_owner

KITS = "swarm-kit"  # below the env dir, the env owner's as the peers are: a kit each, mounted read-only
STALL = 30  # seconds without progress after which a peer gives up (its host then gets the rest directly)
# Seconds the seed and the others wait for each other to enter the step (they start side by side, in one
# operation): one that never comes (it failed just before) is left out.
ARRIVAL = 120


def peer_address(config: HostConfig, ssh_host: str) -> str | None:
    """The address the other hosts reach this host's peer on: `fanout_address`, else its SSH address when that is
    an IP address (the swarm never asks a resolver); None: this host takes the direct path."""
    if config.fanout_address:
        return config.fanout_address
    try:
        return str(ipaddress.ip_address(ssh_host))
    except ValueError:
        return None


def kit_problem(base: BaseImage) -> str | None:
    """Why the kit (libtorrent as this control node runs it) cannot run in BASE, or None."""
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if platform.machine() != "x86_64" or base.platform != "linux/amd64" or base.python != python:
        return (f"the swarm's engine is this control node's libtorrent ({python}, linux/amd64), the runtime image "
                f"has {base.python} on {base.platform}")
    return None


@dataclass
class Member:
    address: str
    port: int
    planned: int  # bytes the plan says it lacks
    needs: dict[str, int] | None = None  # object -> size, as its store was listed when the step began


@dataclass
class Swarm:
    """One fan-out of an env's new objects among this run's hosts that need it: who joins (plan time), who seeds,
    the torrent of what the others lack, and the moments the hosts wait for (run time, one greenlet per host)."""

    env: str
    cache_dir: Path
    min_hosts: int  # the settings of the first host that joins
    min_bytes: int
    members: dict[str, Member] = field(default_factory=dict)
    seed_started: threading.Event = field(default_factory=threading.Event)  # gevent's under pyinfra
    seed_ready: threading.Event = field(default_factory=threading.Event)
    seed_ok: bool = False
    registered: threading.Event = field(default_factory=threading.Event)
    chosen: tuple[str, ...] | None = None  # seed first, then the others (run time)
    torrent_lock: threading.Lock = field(default_factory=threading.Lock)
    torrent: bytes | None = None
    wanted: dict[str, int] = field(default_factory=dict)  # the torrent's objects

    @property
    def kit(self) -> Kit:
        return kit_for(self.cache_dir)  # made once per control node, and only where a swarm runs

    def join(self, host_name: str, address: str, port: int, planned: int) -> None:
        self.members[host_name] = Member(address, port, planned)

    def plan(self) -> str:
        """The plan as it stands, for the log of a dry run and a real one."""
        seed = min(self.members, key=lambda name: self.members[name].planned)
        between = sum(member.planned for name, member in self.members.items() if name != seed)
        if not self.used(list(self.members)):
            return (f"{len(self.members)} host(s) so far need {self.env}; a swarm takes {self.min_hosts} hosts and "
                    f"{self.min_bytes / 1e6:.0f} MB, else the direct path (the last host's line gives the plan)")
        return (f"{seed} is sent {self.members[seed].planned / 1e6:.1f} MB by the control node and seeds; "
                f"{len(self.members) - 1} host(s) fetch {between / 1e6:.1f} MB between hosts")

    def used(self, names: list[str]) -> bool:
        """Enough hosts, and enough new bytes (what the one lacking most lacks) to be worth a swarm."""
        return len(names) >= self.min_hosts and max((self.members[name].planned for name in names), default=0) \
            >= self.min_bytes

    def choose(self, state) -> tuple[str, ...]:
        """The live members, the seed first (the one that lacks least), once per run; () when too few."""
        if self.chosen is None:
            failed = {host.name for host in state.failed_hosts}
            live = [name for name in self.members if name not in failed]
            live.sort(key=lambda name: self.members[name].planned)  # stable: inventory order breaks ties
            self.chosen = tuple(live) if self.used(live) else ()
        return self.chosen

    def role(self, state, host_name: str) -> str | None:
        """"seed", "leech", or None: the direct path (too few hosts, or too little is new)."""
        chosen = self.choose(state)
        return None if host_name not in chosen else "seed" if chosen[0] == host_name else "leech"

    def register(self, host_name: str, needs: dict[str, int]) -> None:
        self.members[host_name].needs = needs
        if self.chosen and all(self.members[name].needs is not None for name in self.chosen[1:]):
            self.registered.set()

    def endpoint(self, host_name: str) -> str:
        """Where HOST_NAME's peer listens: ADDRESS:PORT ([ADDRESS]:PORT for IPv6)."""
        member = self.members[host_name]
        return f"[{member.address}]:{member.port}" if ":" in member.address else f"{member.address}:{member.port}"

    def participants(self) -> list[str]:
        """The seed and the members that lack something (run time, once all registered)."""
        chosen = self.chosen or ()
        return [*chosen[:1], *(name for name in chosen[1:] if self.members[name].needs)]

    def seeded(self, ok: bool) -> None:
        self.seed_ok = ok
        self.seed_ready.set()

    def make_torrent(self) -> bytes | None:
        """The torrent of what the other members lack, once; None when that is too little to be worth a swarm."""
        with self.torrent_lock:
            if self.torrent is None and not self.wanted:
                for name in (self.chosen or ())[1:]:
                    self.wanted.update(self.members[name].needs or {})
                if sum(self.wanted.values()) >= self.min_bytes and self.wanted:
                    self.torrent = make_torrent(self.cache_dir, sorted(self.wanted.items()))
        return self.torrent


# the run's state -> env id -> its swarm: a second run in the same process (another state) makes its own
_swarms: weakref.WeakKeyDictionary[Any, dict[str, list[Swarm]]] = weakref.WeakKeyDictionary()


def joined(config: HostConfig, env: str, cache_dir: Path, base: BaseImage, planned: int) -> Swarm | None:
    """This host's part in the fan-out of ENV (PLANNED bytes new to it), the plan as it stands in the log; None:
    the direct path (fan-out off, or this host cannot join, and the log says why)."""
    if config.fanout == "off":
        return None
    address = peer_address(config, str(host.data.get("ssh_hostname") or host.name))
    problem = kit_problem(base) if address else "no IP address to reach its peer on: set fanout_address"
    if problem or address is None:
        host.log(f"ML env fan-out: {problem}; the direct path")
        return None
    swarms = _swarms.setdefault(host.state, {}).setdefault(env, [])
    # One swarm's hosts all run at once: a leecher waits for its seed in a slot of pyinfra's pool (its size:
    # --parallel, by default 20 a core), so a fleet larger than that has one swarm, and one seed, per pool.
    if not swarms or len(swarms[-1].members) >= host.state.pool.size:
        swarms.append(Swarm(env, cache_dir, config.fanout_min_hosts, config.fanout_min_bytes))
    swarms[-1].join(host.name, address, config.fanout_port, planned)
    host.log(f"ML env fan-out: {swarms[-1].plan()}")
    return swarms[-1]


class KitUpload(StreamedUpload):
    """The swarm's kit (libtorrent and the peer program) in DEST, once per kit, as the env owner: checked against
    its sha256 on the host, unpacked, renamed into place whole (`swarm.sh kit`)."""

    def __init__(self, kit: Kit, dest: str, owner: tuple[int, int]):
        super().__init__(kit.archive, "fan-out kit", dest, owner,
                         receiver=program("swarm.sh", "kit", dest, kit.sha256))


def kit_ready(state, host, arguments: Mapping[str, Any], kit: Kit, run: PeerRun) -> bool:
    """The kit on HOST, sent first where it lacks it."""
    folder = run.kit_dir(kit)
    placed, _ = host.run_shell_command(StringCommand(as_owner(*run.owner, f"test -d {shlex.quote(folder)}")),
                                       **arguments)
    return placed or KitUpload(kit, folder, run.owner).execute(state, host, arguments)


@dataclass(frozen=True)
class PeerRun:
    """What a host's peer runs with: the env store, its owner, the kit, the runtime image and the time it has."""

    env_dir: str
    owner: tuple[int, int]
    image_id: str
    python: str
    seconds: int  # the peer's own deadline, within the host's transfer deadline

    def kit_dir(self, kit: Kit) -> str:
        return f"{self.env_dir}/{KITS}/{kit.id}"

    def command(self, swarm: Swarm, host_name: str, role: str, torrent: bytes) -> str:
        """Stage the torrent and the list of objects the host holds (stdin) as the env owner, then run the peer."""
        others = [swarm.endpoint(name) for name in swarm.participants() if name != host_name]
        stage = as_owner(*self.owner, program("swarm.sh", "stage", self.env_dir, RUN_MARK, len(torrent)))
        peer = program("swarm.sh", "peer", self.kit_dir(swarm.kit), self.image_id, self.python, "%d:%d" % self.owner,
                       self.env_dir, RUN_MARK, role, swarm.endpoint(host_name), self.seconds, STALL, *others)
        return f"{stage} && {peer}"


def fetch(state, host, arguments: Mapping[str, Any], swarm: Swarm, run: PeerRun, needs: dict[str, int],
          log: Callable[[str], None]) -> None:
    """A leecher's part: once the seed holds the env, fetch what this host lacks from the peers, then take into
    the store what arrived whole (`env_store.sh adopt`); whatever is still missing goes the direct way after."""
    swarm.register(host.name, needs)
    if not needs:
        return
    if not swarm.seed_started.wait(ARRIVAL) or not swarm.seed_ready.wait(run.seconds) or not swarm.seed_ok:
        log("ML env fan-out: the seed did not get the env; what this host lacks is sent directly")
        return
    swarm.registered.wait(ARRIVAL)
    torrent = swarm.make_torrent()
    if torrent is None:
        log("ML env fan-out: too little is new for a swarm; sent directly")
        return
    held = "".join(f"{name}\n" for name in sorted(set(swarm.wanted) - set(needs))).encode()
    result, taken = _peer(state, host, arguments, swarm, run, "leech", torrent + held, log)
    log(f"ML env fan-out: {describe(result)}; {taken}")


def serve(state, host, arguments: Mapping[str, Any], swarm: Swarm, run: PeerRun, log: Callable[[str], None]) -> None:
    """The seed's part, once its store holds the env: serve the others until they are done (or give up)."""
    swarm.registered.wait(ARRIVAL)
    if swarm.make_torrent() is None or len(swarm.participants()) < 2:
        return
    result, _ = _peer(state, host, arguments, swarm, run, "seed", swarm.torrent or b"", log)
    log(f"ML env fan-out: the seed {describe(result)}")


def _peer(state, host, arguments: Mapping[str, Any], swarm: Swarm, run: PeerRun, role: str, stdin: bytes,
          log: Callable[[str], None]) -> tuple[SwarmResult, str]:
    """Run the host's peer as ROLE (its kit placed first where it lacks it), then take into the store what arrived
    whole and remove the staging folder (`env_store.sh adopt`): the peer's result and what was taken."""
    if not kit_ready(state, host, arguments, swarm.kit, run):
        return SwarmResult(False, reason="the kit could not be placed"), "nothing was taken into the store"
    command = run.command(swarm, host.name, role, swarm.torrent or b"")
    _, lines = _run(state, host, {**arguments, **deadline.arguments(host, "transfers")}, command, stdin, log)
    adopt = as_owner(*run.owner, program("env_store.sh", "adopt", run.env_dir, RUN_MARK))
    adopted, said = _run(state, host, arguments, adopt, None)
    return parse_result(lines), (said[-1] if adopted and said else "nothing was taken into the store")


def printable(text: str) -> str:
    """TEXT a host printed, as it may reach the log: every character that is not printable shown as '?'."""
    return "".join(char if char.isprintable() else "?" for char in text)


def describe(result: SwarmResult) -> str:
    if not result.complete:
        return f"the swarm did not finish ({printable(result.reason[:200])}); the rest is sent directly"
    return (f"{result.downloaded / 1e6:.1f} MB from peers, {result.uploaded / 1e6:.1f} MB to peers, "
            f"{result.rejected} piece(s) rejected")


def _run(state, host, arguments: Mapping[str, Any], command: str, stdin: bytes | None,
         log: Callable[[str], None] | None = None) -> tuple[bool, list[str]]:
    """COMMAND on HOST over the deploy's connection, STDIN sent to it: its stderr shown line by line as it comes
    (progress), its stdout lines and whether it exited 0."""
    channel = open_channel(state, host, command, arguments)
    if channel is None:
        return False, []
    if stdin:
        channel.sendall(stdin)
    channel.shutdown_write()
    pending, out = b"", b""
    while True:
        if channel.recv_ready():
            out += channel.recv(65536)
        elif channel.recv_stderr_ready():
            *lines, pending = (pending + channel.recv_stderr(65536)).split(b"\n")
            if log is not None:
                for line in lines:  # what a host prints: only printable text reaches the log
                    log(printable(line.decode(errors="replace")))
        elif channel.exit_status_ready():
            break
        else:
            channel.status_event.wait(0.2)
    out += b"".join(iter(lambda: channel.recv(65536), b""))
    status = channel.recv_exit_status()
    channel.close()
    return status == 0, out.decode(errors="replace").splitlines()
