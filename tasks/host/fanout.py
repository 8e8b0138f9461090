"""Hosts feed hosts: what is new leaves the control node once, whatever the size of the fleet.

Three kinds of transfer go this way, each one operation that runs on its hosts side by side: a new env's
objects (tasks/host/ml_env.py `EnvUpload`), a model's blobs in "control" mode (tasks/host/models.py
`ModelUpload`), and an image's archive (tasks/host/stack_images.py `ImageUpload`). Where `fanout` is "auto"
and at least `fanout_min_hosts` hosts of one run need the same files (the one lacking most, at least
`fanout_min_bytes`), the step goes like this:

1. the host that lacks least (the seed) is sent what it lacks directly, as on the direct path, checked there;
2. the control node makes a torrent of the files the others lack (tasks/control/swarm.py: piece hashes, no
   tracker, private); every one of those hosts runs a peer (`files/host/swarm_peer.py`, libtorrent from a kit
   the deploy placed on the host, root's) in a container of the runtime base image on the host's network, as
   the files' owner with every capability dropped: the seed serves its store read-only, the others fetch from
   it and from each other into a staging folder of this run. The peers know only each other's fleet
   addresses (`fanout_address`); no tracker, DHT, local discovery, UPnP or NAT-PMP, switched off in the
   settings the session is made with;
3. each host checks every file it fetched against its hash before it enters its store, cache or engine (the
   kind's adopt: `env_store.sh adopt`, `place_blob.sh --swarm`, `load_image.sh --swarm`); the engine's piece
   hashes are the first line, this the second;
4. the step's peers are gone when it ends (their containers removed, however they ended), and each host is
   sent directly whatever it still lacks, as on the direct path: a host that could not reach its peers or ran
   out of time is complete all the same, and the run says so.

A dry run shows the plan: which host seeds, and the bytes from the control node against those between hosts.
"""

from __future__ import annotations

import ipaddress
import platform
import shlex
import sys
import threading
import time
import weakref
from collections import Counter
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
from .transfer import StreamedUpload, as_owner

# Below stack_root, root's: one kit a host, mounted read-only into every kind's peer, whichever uid it runs as
# (a kit its owner could change would run that owner's code as the peer's uid).
KITS = "swarm-kit"
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
    planned: int | None  # bytes the plan says it lacks; None: not known yet (an image not built), taken as enough
    needs: dict[str, int] | None = None  # object -> size, as its store was listed when the step began


@dataclass
class Swarm:
    """One fan-out of the same files among this run's hosts that need them: who joins (plan time), who seeds,
    the torrent of what the others lack, and the moments the hosts wait for (run time, one greenlet per host)."""

    kind: str  # what the log calls it: "ML env", "Model", "Image"
    label: str  # what is shared: the env id, the model, the image
    folder: Path  # on the control node: the files, by the names the torrent gives them
    kit_cache: Path  # on the control node: where the kit is made (ml_env_cache_dir)
    min_hosts: int  # the settings of the first host that joins
    min_bytes: int
    members: dict[str, Member] = field(default_factory=dict)
    seed_started: threading.Event = field(default_factory=threading.Event)  # gevent's under pyinfra
    seed_ready: threading.Event = field(default_factory=threading.Event)
    seed_ok: bool = False
    registered: threading.Event = field(default_factory=threading.Event)
    # What each member is to be sent, where the kind knows it only at run time (an image's archive holds only the
    # layers the host lacks): the swarm is the largest group sent the same file; the others take the direct path.
    variants: dict[str, str] = field(default_factory=dict)
    arrived: threading.Event = field(default_factory=threading.Event)
    chosen: tuple[str, ...] | None = None  # seed first, then the others (run time)
    torrent_lock: threading.Lock = field(default_factory=threading.Lock)
    torrent: bytes | None = None
    wanted: dict[str, int] = field(default_factory=dict)  # the torrent's objects
    problem: str = ""  # why the torrent could not be made

    @property
    def kit(self) -> Kit:
        return kit_for(self.kit_cache)  # made once per control node, and only where a swarm runs

    def join(self, host_name: str, address: str, port: int, planned: int | None) -> None:
        self.members[host_name] = Member(address, port, planned)

    def _lacks(self, name: str, unknown: int = 0) -> int:
        planned = self.members[name].planned
        return unknown if planned is None else planned

    def plan(self) -> str:
        """The plan as it stands, for the log of a dry run and a real one."""
        seed = min(self.members, key=self._lacks)
        between = sum(self._lacks(name) for name in self.members if name != seed)
        if not self.used(list(self.members)):
            return (f"{len(self.members)} host(s) so far need {self.label}; a swarm takes {self.min_hosts} hosts and "
                    f"{self.min_bytes / 1e6:.0f} MB, else the direct path (the last host's line gives the plan)")
        if any(member.planned is None for member in self.members.values()):
            return (f"{seed} is sent {self.label} by the control node once it is made, and seeds; "
                    f"{len(self.members) - 1} host(s) fetch it between hosts")
        return (f"{seed} is sent {self._lacks(seed) / 1e6:.1f} MB by the control node and seeds; "
                f"{len(self.members) - 1} host(s) fetch {between / 1e6:.1f} MB between hosts")

    def used(self, names: list[str]) -> bool:
        """Enough hosts, and enough new bytes (what the one lacking most lacks) to be worth a swarm."""
        most = max((self._lacks(name, unknown=self.min_bytes) for name in names), default=0)
        return len(names) >= self.min_hosts and most >= self.min_bytes

    def choose(self, state) -> tuple[str, ...]:
        """The live members, the seed first (the one that lacks least), once per run; () when too few."""
        if self.chosen is None:
            failed = {host.name for host in state.failed_hosts}
            live = [name for name in self.members if name not in failed]
            common = Counter(self.variants[name] for name in live if name in self.variants).most_common(1)
            if common:
                live = [name for name in live if self.variants.get(name) == common[0][0]]
            live.sort(key=self._lacks)  # stable: inventory order breaks ties
            self.chosen = tuple(live) if self.used(live) else ()
        return self.chosen

    def role(self, state, host_name: str) -> str | None:
        """"seed", "leech", or None: the direct path (too few hosts, or too little is new)."""
        chosen = self.choose(state)
        return None if host_name not in chosen else "seed" if chosen[0] == host_name else "leech"

    def arrive(self, state, host_name: str, variant: str) -> None:
        """HOST_NAME is to be sent VARIANT: wait (up to ARRIVAL) until every member that has not failed has said
        what it is sent, so that the swarm is chosen knowing them all."""
        self.variants[host_name] = variant
        limit = time.monotonic() + ARRIVAL
        while not self.arrived.is_set() and time.monotonic() < limit:
            failed = {failed_host.name for failed_host in state.failed_hosts}
            if all(name in self.variants or name in failed for name in self.members):
                self.arrived.set()
            self.arrived.wait(0.5)

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
                    try:
                        self.torrent = make_torrent(self.folder, sorted(self.wanted.items()))
                    except (OSError, ValueError) as error:  # the control node's copy: the direct path says more
                        self.problem = f"no torrent of {self.label} ({error})"
        return self.torrent


# the run's state -> what is shared -> its swarms: a second run in the same process (another state) makes its own
_swarms: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], list[Swarm]]] = weakref.WeakKeyDictionary()


def joined(config: HostConfig, kind: str, label: str, folder: Path, base: BaseImage, planned: int | None
           ) -> Swarm | None:
    """This host's part in the fan-out of LABEL (a KIND; its files in FOLDER on the control node, PLANNED bytes
    of them new to this host), the plan as it stands in the log; None: the direct path (fan-out off, or this host
    cannot join, and the log says why)."""
    if config.fanout == "off":
        return None
    address = peer_address(config, str(host.data.get("ssh_hostname") or host.name))
    problem = kit_problem(base) if address else "no IP address to reach its peer on: set fanout_address"
    if problem or address is None:
        host.log(f"{kind} fan-out: {problem}; the direct path")
        return None
    swarms = _swarms.setdefault(host.state, {}).setdefault((kind, label), [])
    # One swarm's hosts all run at once: a leecher waits for its seed in a slot of pyinfra's pool (its size:
    # --parallel, by default 20 a core), so a fleet larger than that has one swarm, and one seed, per pool.
    if not swarms or len(swarms[-1].members) >= host.state.pool.size:
        swarms.append(Swarm(kind, label, folder, Path(config.ml_env_cache_dir).expanduser(),
                            config.fanout_min_hosts, config.fanout_min_bytes))
    swarms[-1].join(host.name, address, config.fanout_port, planned)
    host.log(f"{kind} fan-out: {swarms[-1].plan()}")
    return swarms[-1]


class KitUpload(StreamedUpload):
    """The swarm's kit (libtorrent and the peer program) in DEST, once per kit, as root: checked against its
    sha256 on the host, unpacked, renamed into place whole (`swarm.sh kit`)."""

    def __init__(self, kit: Kit, dest: str):
        super().__init__(kit.archive, "fan-out kit", dest, receiver=program("swarm.sh", "kit", dest, kit.sha256))


def kit_ready(state, host, arguments: Mapping[str, Any], kit: Kit, run: PeerRun) -> bool:
    """The kit on HOST, sent first where it lacks it."""
    folder = run.kit_dir(kit)
    placed, _ = host.run_shell_command(StringCommand(f"test -d {shlex.quote(folder)}"), **arguments)
    return placed or KitUpload(kit, folder).execute(state, host, arguments)


@dataclass(frozen=True)
class PeerRun:
    """What a host's peer runs with: its staging folder WORK (this run's own: the torrent, and what a leecher
    fetches, in WORK/objects), the seed's STORE (served read-only), their owner, the kits' folder, the runtime
    image, the time it has, and the command that takes what arrived (ADOPT, by role; it removes WORK)."""

    work: str
    store: str
    owner: tuple[int, int]
    kits: str
    image_id: str
    python: str
    seconds: int  # the peer's own deadline, within the host's transfer deadline
    adopt: Mapping[str, str]  # role -> the command run after the peer, as it ends

    def kit_dir(self, kit: Kit) -> str:
        return f"{self.kits}/{kit.id}"

    def command(self, swarm: Swarm, host_name: str, role: str, torrent: bytes) -> str:
        """Stage the torrent and the list of files the host holds (stdin) as the owner, then run the peer."""
        others = [swarm.endpoint(name) for name in swarm.participants() if name != host_name]
        stage = as_owner(*self.owner, program("swarm.sh", "stage", self.work, len(torrent)))
        peer = program("swarm.sh", "peer", self.kit_dir(swarm.kit), self.image_id, self.python, "%d:%d" % self.owner,
                       self.work, self.store, role, swarm.endpoint(host_name), self.seconds, STALL, *others)
        return f"{stage} && {peer}"


def peer_run(config: HostConfig, base: BaseImage, work: str, store: str, owner: tuple[int, int],
             adopt: Mapping[str, str]) -> PeerRun:
    """How this host's peer runs, for a kind whose staging folder is WORK and whose seed serves STORE."""
    seconds = max(config.host_transfer_timeout - 60, 30)  # the peer ends first; the host's deadline is the net
    return PeerRun(work, store, owner, f"{config.stack_root}/{KITS}", base.id, base.python, seconds, adopt)


def take_part(state, host, arguments: Mapping[str, Any], fan: tuple[Swarm, PeerRun] | None,
              direct: Callable[[list[str]], bool], needs: Callable[[], dict[str, int]]) -> bool:
    """HOST's part in FAN's swarm, or the DIRECT path alone: a seed is sent what it lacks directly, then serves
    it; a leecher fetches what it NEEDS (name -> size, asked of the host now) from its peers first, then is sent
    directly whatever it still lacks (DIRECT is given what the kind's adopt printed); a host left out of the
    swarm takes the direct path."""
    swarm, run = fan or (None, None)
    role = swarm.role(state, host.name) if swarm else None
    if swarm is None or run is None or role is None:
        return direct([])
    if role == "leech":
        return direct(fetch(state, host, arguments, swarm, run, needs(), host.log))
    swarm.seed_started.set()
    ok = False
    try:
        ok = direct([])
    finally:
        swarm.seeded(ok)
    if ok:
        serve(state, host, arguments, swarm, run, host.log)
    return ok


def fetch(state, host, arguments: Mapping[str, Any], swarm: Swarm, run: PeerRun, needs: dict[str, int],
          log: Callable[[str], None]) -> list[str]:
    """A leecher's part: once the seed holds the files, fetch what this host lacks from the peers, then take in
    what arrived whole (the kind's adopt): what it printed; whatever is still missing goes the direct way after."""
    swarm.register(host.name, needs)
    if not needs:
        return []
    if not swarm.seed_started.wait(ARRIVAL) or not swarm.seed_ready.wait(run.seconds) or not swarm.seed_ok:
        log(f"{swarm.kind} fan-out: the seed did not get {swarm.label}; what this host lacks is sent directly")
        return []
    swarm.registered.wait(ARRIVAL)
    torrent = swarm.make_torrent()
    if torrent is None:
        log(f"{swarm.kind} fan-out: {swarm.problem or 'too little is new for a swarm'}; sent directly")
        return []
    held = "".join(f"{name}\n" for name in sorted(set(swarm.wanted) - set(needs))).encode()
    result, said = _peer(state, host, arguments, swarm, run, "leech", torrent + held, log)
    log(f"{swarm.kind} fan-out: {describe(result)}; {printable(said[-1]) if said else 'nothing was taken in'}")
    return said


def serve(state, host, arguments: Mapping[str, Any], swarm: Swarm, run: PeerRun, log: Callable[[str], None]) -> None:
    """The seed's part, once it holds the files: serve the others until they are done (or give up)."""
    swarm.registered.wait(ARRIVAL)
    if swarm.make_torrent() is None or len(swarm.participants()) < 2:
        _run(state, host, arguments, run.adopt["seed"], None)  # what the seed keeps for serving goes
        return
    result, _ = _peer(state, host, arguments, swarm, run, "seed", swarm.torrent or b"", log)
    log(f"{swarm.kind} fan-out: the seed {describe(result)}")


def _peer(state, host, arguments: Mapping[str, Any], swarm: Swarm, run: PeerRun, role: str, stdin: bytes,
          log: Callable[[str], None]) -> tuple[SwarmResult, list[str]]:
    """Run the host's peer as ROLE (its kit placed first where it lacks it), then the role's adopt (it takes in
    what arrived whole and removes the staging folder): the peer's result and what adopt printed (nothing when
    it failed)."""
    if not kit_ready(state, host, arguments, swarm.kit, run):
        _run(state, host, arguments, run.adopt[role], None)
        return SwarmResult(False, reason="the kit could not be placed"), []
    command = run.command(swarm, host.name, role, swarm.torrent or b"")
    _, lines = _run(state, host, {**arguments, **deadline.arguments(host, "transfers")}, command, stdin, log)
    adopted, said = _run(state, host, arguments, run.adopt[role], None)
    return parse_result(lines), said if adopted else []


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
