"""One peer of the deploy's short-lived swarm (issue 25): hosts feed hosts. It runs on a host as the env
owner's uid, in a container of the runtime image with the host's network, `PYTHONPATH` the kit (the
libtorrent wheel's `libtorrent/` directory); the standard library and libtorrent only.

    python3 swarm_peer.py --torrent FILE --save DIR --listen IP:PORT [--peer IP:PORT]... [--seed]
                          [--skip-from FILE] --expect N --deadline SECONDS [--stall SECONDS]
                          [--upload-limit MBPS]

The torrent (tasks/control/swarm.py makes it) names its files objects/<name>: they are DIR/objects/<name>.
A seed serves them as they are (seed mode: no full check when it starts; libtorrent hashes each piece
the first time a peer asks for it, and a piece that fails makes it leave seed mode and check every file,
so a damaged store object is not served). A leecher downloads every file but those named in --skip-from
(one name a line: file priority 0, never written), each piece checked against the torrent's hash; a piece
that fails (hash_failed_alert) is counted, and fetched again, from another peer where one has it.

Peers: only the --peer addresses, connected to (again every second until they answer); the session
listens on --listen alone and connects from its IP. Everything that would contact other addresses (DHT
and its bootstrap nodes, local peer discovery, UPnP, NAT-PMP, the IP notifier, the WebTorrent STUN
server, a port other than the one given) is off in the settings the session is made with
(`session_settings`), never changed after; the torrent is private and has no tracker and no web seed.
Measured on loopback (1 GiB, one seed, one leecher): the leecher's resident memory peaks at ~180 MB
(libtorrent keeps what it receives in memory until it writes it out), the seed's at ~45 MB.

Exit: 0 complete, once SETTLE seconds have passed since it completed (so that the others see it) and
either --expect other peers need nothing more from it (each is a seed, or wanted a piece from it once
and has not since for QUIET seconds), or nobody has wanted a piece from it for LINGER seconds (a
leecher) or --stall seconds (a seed); 3 incomplete: no progress for --stall seconds, or --deadline
reached; 4 the engine failed (the listen address taken, the torrent unreadable, a file unreadable or
unwritable); 2 bad arguments. SIGTERM and SIGINT end it as the deadline does (0 if complete, else 3).
It never outlives --deadline (counted from its start): the loop ends a little before, and SIGALRM,
whose default action ends the process, is armed for it. Progress goes to stderr every 2 s; the last
line on stdout is `swarm-result {json}`: complete, downloaded and uploaded (payload bytes), rejected
(pieces that failed their hash), peers (the addresses of the connections seen), reason, seconds.
"""

import argparse
import ipaddress
import json
import os
import signal
import sys
import threading
import time
from typing import NamedTuple

import libtorrent as lt

EXIT_COMPLETE, EXIT_INCOMPLETE, EXIT_ENGINE = 0, 3, 4
TICK = 0.25  # seconds between looks at the torrent and its peers
RECONNECT = 1.0  # seconds between connection attempts to a --peer that is not connected
PROGRESS = 2.0  # seconds between progress lines
QUIET = 1.0  # a connected peer that has not wanted a piece from a complete one for this long needs nothing more
SETTLE = 2.0  # a peer stays this long after it completes (> QUIET): the others see that it needs nothing more
LINGER = 3.0  # a complete leecher nobody has wanted a piece from for this long leaves
MB = 1_000_000
# A torrent of ~40,000 objects is ~6 MB: libtorrent's default cap on a .torrent file is 10 MB.
LOAD_LIMITS = {"max_buffer_size": 256 * 1024 * 1024, "max_decode_tokens": 50_000_000}
STOPPING = threading.Event()  # set by SIGTERM or SIGINT


def endpoint(text: str) -> tuple[str, int]:
    """IP:PORT or [IPv6]:PORT, checked: an address, not a name (nothing is ever resolved)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number, address = -1, None
    if not sep or address is None or not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected IP:PORT or [IPv6]:PORT, a port from 1 to 65535")
    return str(address), number


def joined(address: tuple[str, int]) -> str:
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def session_settings(listen: str, upload_limit: int = 0) -> dict:
    """Every setting the session is made with: nothing but the fleet's addresses from its first moment."""
    ip, _ = endpoint(listen)
    return {
        "listen_interfaces": joined(endpoint(listen)),  # this address and port alone
        "outgoing_interfaces": ip,  # connections to peers leave from it
        "listen_system_port_fallback": False,  # no other port when it is taken: fail (exit 4)
        "max_retry_port_bind": 0,  # nor the next ports up
        "enable_dht": False, "dht_bootstrap_nodes": "",  # default: dht.libtorrent.org:25401
        "enable_lsd": False,  # multicast to 239.192.152.143 / ff15::efc0:988f
        "enable_upnp": False, "enable_natpmp": False,  # the gateway's port mapping
        "enable_ip_notifier": False,  # no watching the host's interfaces to re-open sockets
        "webtorrent_stun_server": "",  # default: stun.l.google.com:19302 (only with wss trackers: none here)
        "enable_incoming_utp": False, "enable_outgoing_utp": False,  # TCP alone: one kind of socket to reason about
        "in_enc_policy": int(lt.enc_policy.disabled), "out_enc_policy": int(lt.enc_policy.disabled),
        "close_redundant_connections": False,  # complete peers stay connected: each sees the others complete
        "min_reconnect_time": 1,  # a peer not up yet is tried again within seconds, not a minute
        "max_failcount": 1_000_000,  # nor dropped from the list after 3 refusals
        "unchoke_slots_limit": -1,  # the fleet's hosts cooperate: every peer that wants a piece gets it
        "upload_rate_limit": upload_limit,
        "ignore_limits_on_local_network": False,  # the fleet is a local network: the limit applies there too
        "alert_mask": int(lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage),
    }


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="swarm_peer.py", description="one peer of the deploy's swarm")
    parser.add_argument("--torrent", required=True, help=".torrent file (tasks/control/swarm.py)")
    parser.add_argument("--save", required=True, help="save path: the torrent's files are SAVE/objects/<name>")
    parser.add_argument("--listen", required=True, type=endpoint, help="IP:PORT to listen on and connect from")
    parser.add_argument("--peer", action="append", default=[], type=endpoint, help="IP:PORT of another peer")
    parser.add_argument("--seed", action="store_true", help="SAVE/objects holds every file: serve them")
    parser.add_argument("--skip-from", help="file of object names (one a line) this host holds: not downloaded")
    parser.add_argument("--expect", required=True, type=int, help="how many other peers take part")
    parser.add_argument("--deadline", required=True, type=float, help="seconds: it has ended by then")
    parser.add_argument("--stall", type=float, default=15.0, help="seconds without progress (or wants) to end")
    parser.add_argument("--upload-limit", type=float, default=0.0, help="MB/s this peer uploads at most (0: no cap)")
    args = parser.parse_args(argv)
    if args.expect < 0 or args.deadline <= 0 or args.stall <= 0 or args.upload_limit < 0:
        parser.error("--expect must be >= 0, --deadline and --stall > 0, --upload-limit >= 0")
    return args


def skipped(path: str | None) -> set[str]:
    if path is None:
        return set()
    with open(path, encoding="utf-8") as lines:
        return {line.strip() for line in lines if line.strip()}


def torrent_params(args: argparse.Namespace) -> lt.add_torrent_params:
    """Not auto-managed (no queue), not paused; a seed in seed mode; SKIPPED files at priority 0."""
    params = lt.add_torrent_params()
    params.ti = info = lt.torrent_info(args.torrent, LOAD_LIMITS)
    # A torrent of one object is a single-file torrent named by it (BitTorrent has no one-file directory)
    single = "/" not in info.layout().file_path(0)
    params.save_path = os.path.join(args.save, "objects") if single else args.save
    params.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    if args.seed:
        params.flags |= lt.torrent_flags.seed_mode
    else:
        files, skip = info.layout(), skipped(args.skip_from)
        params.file_priorities = [
            0 if files.file_flags(index) & files.flag_pad_file or files.file_name(index) in skip else 4
            for index in range(files.num_files())]
    return params


class Facts(NamedTuple):
    """What the verdict is taken from, all of it seen by the loop (times in seconds)."""
    seed: bool
    complete: bool
    since_complete: float  # since this peer completed (0 while it has not)
    since_wanted: float  # since a peer last wanted a piece from it (or it completed, whichever is later)
    since_progress: float  # since its download last moved
    peers_done: int  # distinct peers seen needing nothing more from this one
    left: float  # until the loop must end
    error: str  # the engine's, "" when none
    signalled: bool


def verdict(facts: Facts, expect: int, stall: float) -> tuple[str, int] | None:
    """Why this peer ends now and its exit status, or None: it goes on."""
    code = EXIT_COMPLETE if facts.complete else EXIT_INCOMPLETE
    if facts.error:
        return f"engine: {facts.error}", EXIT_ENGINE
    if facts.signalled:
        return "signal", code
    if facts.left <= 0:
        return "deadline", code
    if not facts.complete:
        return ("stalled", code) if facts.since_progress >= stall else None
    if facts.since_complete < SETTLE:
        return None
    if facts.peers_done >= expect:
        return "done", code
    if facts.since_wanted >= (stall if facts.seed else LINGER):
        return "idle", code
    return None


class Swarm:
    """The session, its one torrent and what the loop has seen of them."""

    def __init__(self, args: argparse.Namespace, started: float):
        self.args, self.started = args, started
        limit = int(args.upload_limit * MB)
        self.session = lt.session(session_settings(joined(args.listen), limit))
        self.handle = self.session.add_torrent(torrent_params(args))
        self.rejected, self.error = 0, ""
        self.interested_at: dict[bytes, float] = {}  # by peer id: when it last wanted a piece
        self.first_seen: dict[bytes, float] = {}
        self.peers_done: set[bytes] = set()
        self.seen: set[str] = set()
        self.completed_at: float | None = started if args.seed else None
        self.wanted_at = self.progress_at = self.connect_at = self.printed_at = started
        self.done = -1

    def read_alerts(self) -> None:
        for alert in self.session.pop_alerts():
            if isinstance(alert, lt.hash_failed_alert):
                self.rejected += 1
            elif isinstance(alert, (lt.listen_failed_alert, lt.torrent_error_alert, lt.file_error_alert)):
                self.error = self.error or alert.message()

    def look(self, now: float) -> lt.torrent_status:
        """The torrent's status; which peers are complete and whether one wants a piece from this one."""
        status = self.handle.status()
        if status.total_wanted_done != self.done or status.state == status.checking_files:
            self.done, self.progress_at = status.total_wanted_done, now
        if status.is_finished and self.completed_at is None:
            self.completed_at = self.wanted_at = now
        connected = {self.look_at(peer, now) for peer in self.handle.get_peer_info()}
        if now - self.connect_at >= RECONNECT:
            self.connect_at = now
            for peer in self.args.peer:
                if peer[0] not in connected:
                    self.handle.connect_peer(peer)
        return status

    def look_at(self, peer: lt.peer_info, now: float) -> str:
        """Note a connected peer; return its IP. It needs nothing more from this one when it is a seed or
        when, this one being complete, it has taken part (wanted a piece from it, got one, or holds some)
        and has not wanted a piece from it for QUIET seconds: a complete peer's pieces never change, so
        what the other does not want now it never will. (A peer that holds nothing and never wanted a piece
        may not have started. libtorrent's upload-only flag is not read: it is sent only where redundant
        connections are closed, and they are kept here.)"""
        pid = peer.pid.to_bytes()
        self.seen.add(joined(peer.ip))
        if peer.flags & lt.peer_info.remote_interested:
            self.interested_at[pid] = self.wanted_at = now
        since = max(self.interested_at.get(pid, 0.0), self.first_seen.setdefault(pid, now), self.completed_at or now)
        took_part = pid in self.interested_at or peer.total_upload > 0 or peer.num_pieces > 0
        if peer.flags & lt.peer_info.seed or (self.completed_at is not None and took_part and now - since >= QUIET):
            self.peers_done.add(pid)
        return peer.ip[0]

    def facts(self, now: float, end: float) -> Facts:
        completed = self.completed_at
        return Facts(
            seed=self.args.seed, complete=completed is not None,
            since_complete=0.0 if completed is None else now - completed,
            since_wanted=now - self.wanted_at, since_progress=now - self.progress_at,
            peers_done=len(self.peers_done), left=end - now, error=self.error,
            signalled=STOPPING.is_set())

    def progress(self, status: lt.torrent_status, now: float) -> None:
        if now - self.printed_at < PROGRESS:
            return
        self.printed_at = now
        wanted = max(status.total_wanted, 1)
        print(f"swarm: {status.total_wanted_done / MB:.1f} / {status.total_wanted / MB:.1f} MB"
              f" ({100 * status.total_wanted_done // wanted}%), {status.num_peers} peers,"
              f" down {status.download_payload_rate / MB:.1f} MB/s, up {status.upload_payload_rate / MB:.1f} MB/s",
              file=sys.stderr, flush=True)

    def result(self, reason: str, now: float) -> str:
        status = self.handle.status()
        return result_line(self.completed_at is not None, status.total_payload_download,
                           status.total_payload_upload, self.rejected, sorted(self.seen), reason, now - self.started)

    def close(self) -> None:
        """The session's destructor closes its sockets and waits for its threads."""
        del self.handle, self.session


def result_line(complete: bool, downloaded: int, uploaded: int, rejected: int, peers: list[str], reason: str,
                seconds: float) -> str:
    return "swarm-result " + json.dumps({
        "complete": complete, "downloaded": downloaded, "uploaded": uploaded, "rejected": rejected,
        "peers": peers, "reason": reason, "seconds": round(seconds, 3)}, sort_keys=True)


def run(swarm: Swarm, end: float) -> tuple[str, int]:
    while True:
        now = time.monotonic()
        swarm.read_alerts()
        status = swarm.look(now)
        swarm.progress(status, now)
        decided = verdict(swarm.facts(now, end), swarm.args.expect, swarm.args.stall)
        if decided is not None:
            return decided
        swarm.session.wait_for_alert(int(TICK * 1000))


def main(argv: list[str]) -> int:
    started = time.monotonic()
    args = arguments(argv)
    signal.setitimer(signal.ITIMER_REAL, args.deadline)  # SIGALRM's default action ends the process
    end = started + args.deadline - min(1.0, args.deadline / 10)  # time left to print and close the session
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: STOPPING.set())
    try:
        swarm = Swarm(args, started)
    except (RuntimeError, OSError) as error:  # the torrent or the skip list unreadable, a bad setting
        print(result_line(False, 0, 0, 0, [], f"engine: {error}", time.monotonic() - started), flush=True)
        return EXIT_ENGINE
    reason, code = run(swarm, end)
    print(swarm.result(reason, time.monotonic()), flush=True)
    swarm.close()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
