"""The fan-out swarm's engine pieces (issue 25): files/host/swarm_peer.py run as real processes with real
libtorrent, each peer on a loopback address of its own (127.a.b.x: a host has an address of its own), and
tasks/control/swarm.py's torrent and result line. No root, no docker."""

import hashlib
import importlib.util
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import libtorrent as lt
import pytest

from tasks.control.swarm import SwarmResult, make_torrent, parse_result

ROOT = Path(__file__).parents[2]
PEER = ROOT / "files/host/swarm_peer.py"
STRACE = "/usr/bin/strace"
PIECE = 32 * 1024
SIZES = [0, 1, 100_003, 700_000, 1_100_001, 1_000_000]  # an empty object, a 1-byte one, several pieces each


def load_peer():
    """The peer program as a module (it is a file run on hosts, not part of the package)."""
    spec = importlib.util.spec_from_file_location("swarm_peer", PEER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


swarm_peer = load_peer()


def write_objects(directory: Path, sizes: list[int], seed: int = 25) -> dict[str, bytes]:
    """Objects named as in a host's store (<sha256>-<mode>), random content; {name: content}."""
    randomness, objects = random.Random(seed), {}
    (directory / "objects").mkdir(parents=True)
    for size in sizes:
        content = randomness.randbytes(size)
        name = f"{hashlib.sha256(content).hexdigest()}-644"
        (directory / "objects" / name).write_bytes(content)
        objects[name] = content
    return objects


@pytest.fixture
def payload(tmp_path):
    """The seed's directory, its torrent and its objects."""
    objects = write_objects(tmp_path / "seed", SIZES)
    torrent = tmp_path / "objects.torrent"
    listed = [(name, len(data)) for name, data in objects.items()]
    torrent.write_bytes(make_torrent(tmp_path / "seed" / "objects", listed, PIECE))
    return tmp_path / "seed", torrent, objects


def addresses(count: int) -> list[str]:
    """COUNT free IP:PORTs, each on a loopback address of its own."""
    net, found = (random.randrange(1, 255), random.randrange(1, 255)), []
    for last in range(2, 2 + count):
        with socket.socket() as probe:
            probe.bind((f"127.{net[0]}.{net[1]}.{last}", 0))
            found.append("%s:%d" % probe.getsockname())
    return found


def ip_port(address: str) -> tuple[str, int]:
    ip, _, port = address.rpartition(":")
    return ip, int(port)


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_peer_left():
    """A test that fails midway leaves no peer running."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def start(log: Path, torrent: Path, save: Path, listen: str, peers: list[str], *options: str,
          expect: int = 1, deadline: float = 30, stall: float = 30, wrap: tuple[str, ...] = ()) -> subprocess.Popen:
    command = [*wrap, sys.executable, str(PEER), "--torrent", str(torrent), "--save", str(save), "--listen", listen,
               *(f"--peer={peer}" for peer in peers), "--expect", str(expect), "--deadline", str(deadline),
               "--stall", str(stall), *options]
    with log.open("w") as stderr:
        STARTED.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True))
    return STARTED[-1]


def ended(process: subprocess.Popen, within: float) -> tuple[int, SwarmResult, float]:
    """Its exit status, its result line read by parse_result, and when it ended (time.monotonic())."""
    stdout, _ = process.communicate(timeout=within)
    return process.returncode, parse_result(stdout.splitlines()), time.monotonic()


def held(save: Path) -> dict[str, str]:
    """sha256 of each file below SAVE, by path relative to it."""
    return {str(path.relative_to(save)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(save.rglob("*")) if path.is_file()}


def digests(objects: dict[str, bytes]) -> dict[str, str]:
    return {f"objects/{name}": hashlib.sha256(data).hexdigest() for name, data in objects.items()}


def read_only(directory: Path) -> tuple[str, ...]:
    """A command prefix that runs the command with DIRECTORY mounted read-only (as a host's store is in the
    peer's container): in a user and mount namespace of its own, where the kernel allows them; else none."""
    prefix = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
              'mount --bind -o ro "$0" "$0" && exec "$@"', str(directory))
    usable = subprocess.run([*prefix, "true"], capture_output=True).returncode == 0
    return prefix if usable else ()


def test_a_seed_and_two_leechers_end_with_the_seeds_objects_and_leave_by_themselves(payload, tmp_path):
    seed_dir, torrent, objects = payload
    skipped = sorted(objects)[2]
    (tmp_path / "skip").write_text(f"{skipped}\nnot-in-the-torrent\n")
    seed_at, one_at, two_at = everyone = addresses(3)
    began = time.monotonic()
    seed = start(tmp_path / "seed.log", torrent, seed_dir, seed_at, [one_at, two_at], "--seed", expect=2,
                 wrap=read_only(seed_dir / "objects"))
    one = start(tmp_path / "one.log", torrent, tmp_path / "one", one_at, [seed_at, two_at],
                "--skip-from", str(tmp_path / "skip"), expect=2)
    two = start(tmp_path / "two.log", torrent, tmp_path / "two", two_at, [seed_at, one_at], expect=2)
    (seed_code, by_seed, seed_end), (one_code, by_one, one_end), (two_code, by_two, two_end) = (
        ended(seed, 40), ended(one, 40), ended(two, 40))

    assert (seed_code, one_code, two_code) == (0, 0, 0), (by_seed, by_one, by_two)
    assert by_one.complete and by_two.complete and by_seed.complete
    # --stall is 30 s: the seed left because it saw both leechers complete, the leechers because the others
    # were complete or (the short linger) nobody wanted a piece from them
    assert by_seed.reason == "done" and {by_one.reason, by_two.reason} <= {"done", "idle"}
    assert max(seed_end, one_end, two_end) - began < 15, (seed_end - began, one_end - began, two_end - began)
    wanted = digests(objects)
    assert held(tmp_path / "two") == wanted
    del wanted[f"objects/{skipped}"]
    assert held(tmp_path / "one") == wanted  # the skipped object never written, no part file beside them
    assert os.listdir(tmp_path / "one") == ["objects"]
    assert by_one.downloaded >= sum(len(objects[name]) for name in objects if name != skipped)
    assert by_seed.uploaded > 0 and by_seed.downloaded == 0
    ips = {ip_port(address)[0] for address in everyone}
    assert {ip_port(peer)[0] for result in (by_seed, by_one, by_two) for peer in result.peers} == ips


def test_a_leecher_killed_mid_swarm_leaves_the_other_to_complete_and_the_seed_to_leave(payload, tmp_path):
    seed_dir, torrent, objects = payload
    seed_at, one_at, two_at = addresses(3)
    # the seed sends 1 MB/s at most: the leechers need 3 s for the 2.9 MB; one is killed 2 s after it starts
    # (libtorrent holds what it receives in memory until it flushes: its files do not show how far it got)
    seed = start(tmp_path / "seed.log", torrent, seed_dir, seed_at, [one_at, two_at], "--seed",
                 "--upload-limit", "1", expect=2, stall=3)
    one = start(tmp_path / "one.log", torrent, tmp_path / "one", one_at, [seed_at, two_at], expect=2)
    two = start(tmp_path / "two.log", torrent, tmp_path / "two", two_at, [seed_at, one_at], expect=2)
    time.sleep(2)
    one.kill()
    one.wait()

    two_code, by_two, _ = ended(two, 40)
    seed_code, by_seed, _ = ended(seed, 40)
    assert (two_code, by_two.complete) == (0, True), by_two
    assert held(tmp_path / "two") == digests(objects)
    assert held(tmp_path / "one") != digests(objects)  # killed before it had everything
    assert (seed_code, by_seed.reason) == (0, "idle")  # one leecher never completed: nobody wanted more


def corrupt_copy(seed_dir: Path, rogue_dir: Path, torrent: Path, name: str) -> int:
    """ROGUE_DIR/objects: the seed's objects with one byte of NAME flipped; the piece that holds it."""
    (rogue_dir / "objects").mkdir(parents=True)
    for path in (seed_dir / "objects").iterdir():
        (rogue_dir / "objects" / path.name).write_bytes(path.read_bytes())
    target = rogue_dir / "objects" / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(data)
    files = lt.torrent_info(str(torrent)).layout()
    index = next(index for index in range(files.num_files()) if files.file_name(index) == name)
    return (files.file_offset(index) + len(data) // 2) // PIECE


def rogue_session(listen: str, save: Path, torrent: Path) -> tuple[lt.session, lt.torrent_handle]:
    """A peer that serves what it holds unchecked (libtorrent's seed mode would check each piece once
    before serving it: hash checks off here), with the peer program's own network settings."""
    settings = swarm_peer.session_settings(listen)
    settings["disable_hash_checks"] = True
    settings["alert_mask"] = int(lt.alert_category.upload)
    session = lt.session(settings)
    params = lt.add_torrent_params()
    params.ti, params.save_path = lt.torrent_info(str(torrent)), str(save)
    params.flags = (params.flags | lt.torrent_flags.seed_mode) & ~(
        lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    return session, session.add_torrent(params)


def served(session: lt.session, piece: int, within: float) -> bool:
    """Whether SESSION uploads a block of PIECE within WITHIN seconds."""
    until = time.monotonic() + within
    while time.monotonic() < until:
        if any(isinstance(alert, lt.block_uploaded_alert) and alert.piece_index == piece
               for alert in session.pop_alerts()):
            return True
        time.sleep(0.05)
    return False


def test_a_piece_a_rogue_peer_corrupted_is_rejected_and_fetched_again_from_the_seed(payload, tmp_path):
    seed_dir, torrent, objects = payload
    bad_piece = corrupt_copy(seed_dir, tmp_path / "rogue", torrent, sorted(objects, key=lambda n: -len(objects[n]))[0])
    rogue_at, leecher_at, seed_at = addresses(3)
    session, _ = rogue_session(rogue_at, tmp_path / "rogue", torrent)
    leecher = start(tmp_path / "leecher.log", torrent, tmp_path / "leecher", leecher_at, [rogue_at, seed_at],
                    expect=2)
    # the leecher's only peer is the rogue until it has served the corrupted piece; then the seed starts
    assert served(session, bad_piece, 15), "the rogue never served the corrupted piece"
    seed = start(tmp_path / "seed.log", torrent, seed_dir, seed_at, [leecher_at], "--seed", stall=4)

    code, result, _ = ended(leecher, 40)
    ended(seed, 40)
    del session
    assert (code, result.complete) == (0, True), result
    assert result.rejected >= 1
    assert held(tmp_path / "leecher") == digests(objects)


INET = re.compile(r'(?P<call>connect|sendto|sendmsg|bind)\(\d+, .*?sa_family=AF_INET6?, '
                  r'sin6?_port=htons\((?P<port>\d+)\), .*?(?:inet_addr\("|inet_pton\(AF_INET6, ")(?P<ip>[^"]+)"')


def inet_calls(trace: Path) -> set[tuple[str, str, int]]:
    """(call, ip, port) of every inet address a traced process bound, connected or sent to."""
    return {(match["call"], match["ip"], int(match["port"])) for match in INET.finditer(trace.read_text())}


def test_the_peers_bind_connect_and_send_only_to_the_addresses_they_are_given(tmp_path):
    objects = write_objects(tmp_path / "seed", [300_000])  # one object: a single-file torrent
    torrent = tmp_path / "objects.torrent"
    listed = [(name, len(data)) for name, data in objects.items()]
    torrent.write_bytes(make_torrent(tmp_path / "seed" / "objects", listed))
    seed_at, leecher_at = addresses(2)
    strace = (STRACE, "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,bind")
    seed = start(tmp_path / "seed.log", torrent, tmp_path / "seed", seed_at, [leecher_at], "--seed",
                 wrap=(*strace, "-o", str(tmp_path / "seed.trace")))
    leecher = start(tmp_path / "leecher.log", torrent, tmp_path / "leecher", leecher_at, [seed_at],
                    wrap=(*strace, "-o", str(tmp_path / "leecher.trace")))
    (leecher_code, by_leecher, _), (seed_code, _, _) = ended(leecher, 40), ended(seed, 40)
    assert (leecher_code, seed_code, by_leecher.complete) == (0, 0, True), by_leecher
    assert held(tmp_path / "leecher") == digests(objects)

    for own, other, trace in ((seed_at, leecher_at, "seed.trace"), (leecher_at, seed_at, "leecher.trace")):
        ip, port = ip_port(own)
        calls = inet_calls(tmp_path / trace)
        allowed = {("bind", ip, port), ("bind", ip, 0)} | {(call, *ip_port(other)) for call in
                                                         ("connect", "sendto", "sendmsg")}
        assert ("bind", ip, port) in calls  # the trace is read: the listening socket is there
        assert calls - allowed == set(), f"{trace}: {sorted(calls - allowed)}"
        assert "AF_UNIX" not in "".join(line for line in (tmp_path / trace).read_text().splitlines()
                                        if "connect(" in line)  # no name service, no syslog
    settings = swarm_peer.session_settings("10.213.0.5:6900")
    assert {key: settings[key] for key in ("enable_dht", "enable_lsd", "enable_upnp", "enable_natpmp",
                                           "enable_ip_notifier", "dht_bootstrap_nodes", "listen_interfaces",
                                           "outgoing_interfaces", "listen_system_port_fallback")} == {
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        "enable_ip_notifier": False, "dht_bootstrap_nodes": "", "listen_interfaces": "10.213.0.5:6900",
        "outgoing_interfaces": "10.213.0.5", "listen_system_port_fallback": False}
    settings = swarm_peer.session_settings("[fd00::5]:6900")
    assert (settings["listen_interfaces"], settings["outgoing_interfaces"]) == ("[fd00::5]:6900", "fd00::5")


def test_a_peer_ends_at_its_deadline_when_stalled_on_a_signal_and_when_its_port_is_taken(payload, tmp_path):
    """Run at once: a leecher whose only peer accepts and never answers (deadline 3 s); one whose peer
    refuses (stall 2 s); a seed sent SIGTERM; a seed whose listening port is taken."""
    seed_dir, torrent, _ = payload
    silent_at, refusing_at, late_at, stalled_at, seed_at, taken_at = addresses(6)
    with socket.socket() as silent, socket.socket() as taken:
        silent.bind(ip_port(silent_at))
        silent.listen(8)
        taken.bind(ip_port(taken_at))
        taken.listen(8)
        began = time.monotonic()
        late = start(tmp_path / "late.log", torrent, tmp_path / "late", late_at, [silent_at], deadline=3, stall=60)
        stalled = start(tmp_path / "stalled.log", torrent, tmp_path / "stalled", stalled_at, [refusing_at], stall=2)
        seed = start(tmp_path / "seed.log", torrent, seed_dir, seed_at, [refusing_at], "--seed")
        clash = start(tmp_path / "clash.log", torrent, seed_dir, taken_at, [refusing_at], "--seed")
        time.sleep(1.5)
        seed.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        outcomes = {name: ended(process, 20) for name, process in
                    (("late", late), ("stalled", stalled), ("seed", seed), ("clash", clash))}
    code, result, end = outcomes["late"]
    # Its loop ended at the deadline and said so; closing the session after that may outlast what is left of a 3 s
    # deadline on a loaded machine, and then SIGALRM (armed for the deadline) ends it: in time either way.
    assert code in (3, -signal.SIGALRM) and (result.complete, result.reason) == (False, "deadline")
    assert end - began < 3 + 2
    code, result, end = outcomes["stalled"]
    assert (code, result.complete, result.reason) == (3, False, "stalled") and end - began < 2 + 3
    code, result, end = outcomes["seed"]
    assert (code, result.reason) == (0, "signal") and end - signalled < 5  # its deadline is 30 s
    with socket.socket() as again:
        again.bind(ip_port(seed_at))  # no socket of the seed's is left on its port
    code, result, _ = outcomes["clash"]
    assert code == 4 and "Address already in use" in result.reason, result


def test_bad_arguments_are_refused_naming_the_argument_and_what_is_expected(tmp_path):
    done = subprocess.run([sys.executable, str(PEER), "--torrent", "x", "--save", str(tmp_path), "--listen",
                           "localhost:6881", "--expect", "1", "--deadline", "5"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "argument --listen: 'localhost:6881': expected IP:PORT or [IPv6]:PORT" in done.stderr


def verdict_for(**changed):
    facts = dict(seed=False, complete=True, since_complete=5.0, since_wanted=0.0, since_progress=0.0,
                 peers_done=2, left=10.0, error="", signalled=False)
    return swarm_peer.verdict(swarm_peer.Facts(**{**facts, **changed}), 2, 15.0)


def test_the_verdict_is_a_function_of_what_the_peer_saw():
    assert verdict_for() == ("done", 0)
    assert verdict_for(since_complete=1.0) is None  # others have yet to see it complete
    assert verdict_for(peers_done=1, since_wanted=1.0) is None
    assert verdict_for(peers_done=1, since_wanted=swarm_peer.LINGER) == ("idle", 0)
    assert verdict_for(seed=True, peers_done=1, since_wanted=swarm_peer.LINGER) is None  # a seed waits --stall
    assert verdict_for(seed=True, peers_done=1, since_wanted=15.0) == ("idle", 0)
    assert verdict_for(complete=False, since_complete=0.0, peers_done=0, since_progress=14.0) is None
    assert verdict_for(complete=False, since_complete=0.0, since_progress=15.0) == ("stalled", 3)
    assert verdict_for(complete=False, left=0.0) == ("deadline", 3)
    assert verdict_for(signalled=True, complete=False) == ("signal", 3)
    assert verdict_for(error="disk full", signalled=True) == ("engine: disk full", 4)


MAKE = """
import json, sys
from pathlib import Path
from tasks.control.swarm import make_torrent
root, objects = Path(sys.argv[1]), json.loads(sys.argv[2])
Path(sys.argv[3]).write_bytes(make_torrent(root / "objects", [tuple(o) for o in objects], 32768))
Path(sys.argv[4]).write_bytes(make_torrent(root / "objects", [tuple(o) for o in reversed(objects)], 32768))
"""


def test_make_torrent_is_deterministic_and_opens_no_socket(tmp_path):
    objects = write_objects(tmp_path / "store", SIZES)
    listed = [[name, len(data)] for name, data in objects.items()]
    trace = tmp_path / "make.trace"
    subprocess.run([STRACE, "-f", "-qq", "-e", "trace=socket,connect,bind", "-o", str(trace), sys.executable,
                    "-c", MAKE, str(tmp_path / "store"), repr(listed).replace("'", '"'), str(tmp_path / "a"),
                    str(tmp_path / "b")], check=True, cwd=ROOT)
    assert trace.read_text() == ""  # no socket made, let alone a session
    made = (tmp_path / "a").read_bytes()
    again = make_torrent(tmp_path / "store" / "objects", [(name, size) for name, size in listed], PIECE)
    assert made == (tmp_path / "b").read_bytes() == again
    decoded = lt.bdecode(made)
    assert set(decoded) == {b"info", b"piece layers"}  # no announce, creation date, creator, web seeds
    info = decoded[b"info"]
    assert (info[b"name"], info[b"private"], info[b"meta version"], info[b"piece length"]) == (
        b"objects", 1, 2, PIECE)
    files = lt.torrent_info(made).layout()
    assert sorted(files.file_path(index) for index in range(files.num_files())
                  if not files.file_flags(index) & files.flag_pad_file) == sorted(f"objects/{n}" for n in objects)


def test_make_torrent_refuses_what_it_cannot_make_naming_it(tmp_path):
    objects = write_objects(tmp_path / "store", [10])
    (name, data), = objects.items()
    with pytest.raises(ValueError, match=r"objects/[0-9a-f]{64}-644: 10 bytes, expected 11"):
        make_torrent(tmp_path / "store" / "objects", [(name, 11)])
    with pytest.raises(ValueError, match=r"object name '\.\./x': expected a file name"):
        make_torrent(tmp_path / "store" / "objects", [(name, 10), ("../x", 1)])
    with pytest.raises(ValueError, match="piece_size 1000: expected a power of two"):
        make_torrent(tmp_path / "store" / "objects", [(name, 10)], 1000)
    with pytest.raises(ValueError, match="at least one object with content"):
        make_torrent(tmp_path / "store" / "objects", [])


@pytest.mark.parametrize("lines, expected", [
    (["noise", 'swarm-result {"complete": true, "downloaded": 5, "uploaded": 0, "rejected": 1, '
               '"peers": ["10.0.0.2:6881"], "reason": "done", "seconds": 1.5}'],
     SwarmResult(True, 5, 0, 1, ("10.0.0.2:6881",), "done")),
    (["swarm: 1.0 / 2.0 MB"], SwarmResult(False, reason="no swarm-result line in the peer's output")),
    (["swarm-result {not json"], None),
    (['swarm-result {"complete": "yes", "downloaded": 5, "uploaded": 0, "rejected": 0, "peers": [], '
      '"reason": ""}'], SwarmResult(False, reason="swarm-result: complete is 'yes', expected bool")),
    (['swarm-result {"complete": true, "downloaded": true, "uploaded": 0, "rejected": 0, "peers": [], '
      '"reason": ""}'], SwarmResult(False, reason="swarm-result: downloaded is True, expected a count")),
    (['swarm-result {"complete": true, "downloaded": -1, "uploaded": 0, "rejected": 0, "peers": [], '
      '"reason": ""}'], SwarmResult(False, reason="swarm-result: downloaded is -1, expected a count")),
    (['swarm-result {"complete": true, "downloaded": 1, "uploaded": 0, "rejected": 0, "peers": [1], '
      '"reason": ""}'], SwarmResult(False, reason="swarm-result: peers is [1], expected a list of addresses")),
    (["swarm-result [1]"], SwarmResult(False, reason="swarm-result: expected an object, got list")),
])
def test_parse_result_takes_the_last_result_line_and_checks_every_value(lines, expected):
    result = parse_result(lines)
    if expected is None:
        assert not result.complete and result.reason.startswith("swarm-result is not JSON")
    else:
        assert result == expected


def test_a_torrent_names_its_files_objects_whatever_folder_holds_them(tmp_path):
    """An HF cache's blobs/ or the image cache makes the torrent an env store's objects/ would: the peers save
    every kind alike."""
    objects = write_objects(tmp_path / "store", [1000, 70_000])
    (tmp_path / "cache").mkdir()
    os.rename(tmp_path / "store" / "objects", tmp_path / "cache" / "blobs")
    listed = [(name, len(data)) for name, data in objects.items()]
    from_blobs = make_torrent(tmp_path / "cache" / "blobs", listed, PIECE)
    os.rename(tmp_path / "cache" / "blobs", tmp_path / "store" / "objects")
    assert from_blobs == make_torrent(tmp_path / "store" / "objects", listed, PIECE)
    files = lt.torrent_info(from_blobs).layout()
    assert {files.file_path(index) for index in range(files.num_files())
            if not files.file_flags(index) & files.flag_pad_file} == {f"objects/{name}" for name in objects}
