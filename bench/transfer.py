"""`make bench-transfer`: one 500 MB file sent to a rehearsal host by the deploy's upload paths, next to
OpenSSH's `ssh host 'cat > file'` on the same link (the floor issue 15 sets: at least 80 % of it), and
paramiko's SFTP for reference, each timed 3 times in one run; the hash of what arrived is checked.

The deploy's paths are `StreamedUpload`'s (tasks/host/transfer.py), running `files/host/receive_file.sh`:
its own code streaming into OpenSSH (what uploads use), and an exec channel of a paramiko connection
with pyinfra's defaults fed 1 MiB chunks (where OpenSSH cannot stand in for the connection, e.g. a
password login). Uses its own fleet ("xfer") and removes it at the end. Prints a table; asserts only
that every copy arrived whole.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from rehearsal.fleet import Fleet, HostRecord
from tasks.host.programs import program
from tasks.host.transfer import CHUNK, StreamedUpload

SIZE = 500 * 10**6
REPEATS = 3
DEST = "/srv/bench-transfer.bin"


def connect(fleet: Fleet, record: HostRecord) -> paramiko.SSHClient:
    """A paramiko connection as pyinfra opens one (its defaults: window, packet size, ciphers)."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(fleet.known_hosts))
    client.connect(record.ip, username="root", key_filename=str(fleet.key), look_for_keys=False,
                   allow_agent=False)
    return client


def by_openssh(fleet: Fleet, record: HostRecord, source: Path) -> None:
    with source.open("rb") as data:
        subprocess.run([*fleet.ssh_argv(record), f"cat > {DEST}"], stdin=data, check=True)


class Quiet:
    """Where StreamedUpload logs its progress: nowhere, in a bench."""

    def log(self, _: str) -> None:
        pass


def by_streamed_upload(fleet: Fleet, record: HostRecord, source: Path) -> None:
    upload = StreamedUpload(source, "bench", DEST)
    with source.open("rb") as data:
        status, said = upload._by_openssh([*fleet.ssh_argv(record), upload.receive], data, SIZE, Quiet())
    if status != 0:
        raise RuntimeError(f"exit {status}: {said}")


def by_exec_channel(fleet: Fleet, record: HostRecord, source: Path) -> None:
    client = connect(fleet, record)
    try:
        channel = client.get_transport().open_session()
        channel.exec_command(program("receive_file.sh", DEST, "0600"))
        with source.open("rb") as data:
            while chunk := data.read(CHUNK):
                channel.sendall(chunk)
        channel.shutdown_write()
        if channel.recv_exit_status() != 0:
            raise RuntimeError(channel.recv_stderr(4096).decode(errors="replace"))
    finally:
        client.close()


def by_sftp(fleet: Fleet, record: HostRecord, source: Path) -> None:
    client = connect(fleet, record)
    try:
        with client.open_sftp() as sftp:
            sftp.put(str(source), DEST)
    finally:
        client.close()


METHODS: dict[str, Callable[[Fleet, HostRecord, Path], None]] = {
    "ssh 'cat > file' (OpenSSH, the floor)": by_openssh,
    "StreamedUpload into OpenSSH (the deploy's uploads)": by_streamed_upload,
    "paramiko exec channel (where OpenSSH cannot stand in)": by_exec_channel,
    "paramiko SFTP put (reference)": by_sftp,
}


def timed(method, fleet: Fleet, record: HostRecord, source: Path, digest: str) -> float:
    fleet_ssh = fleet.ssh_argv(record)
    subprocess.run([*fleet_ssh, f"rm -f {DEST}"], check=True)
    started = time.monotonic()
    method(fleet, record, source)
    took = time.monotonic() - started
    arrived = subprocess.run([*fleet_ssh, f"sha256sum {DEST}"], capture_output=True, text=True, check=True)
    assert arrived.stdout.split()[0] == digest, "the copy that arrived is not the file sent"
    return took


def main() -> None:
    fleet = Fleet("xfer")
    try:
        (record,) = fleet.up(1)
        with tempfile.TemporaryDirectory(prefix="mlstack-bench-") as scratch:
            source = Path(scratch) / "payload.bin"
            hashing = hashlib.sha256()
            with source.open("wb") as out:
                for _ in range(SIZE // 10**6):
                    block = os.urandom(10**6)  # incompressible: no transport can cheat
                    hashing.update(block)
                    out.write(block)
            digest = hashing.hexdigest()
            times = {name: [timed(method, fleet, record, source, digest) for _ in range(REPEATS)]
                     for name, method in METHODS.items()}
    finally:
        fleet.down()
    floor = statistics.median(next(iter(times.values())))
    print(f"\n{SIZE / 1e6:.0f} MB to one rehearsal host (median of {REPEATS}; each copy's sha256 checked)\n")
    print(f"| {'path':56} | seconds | MB/s | of OpenSSH |")
    print(f"|{'-' * 58}|--------:|-----:|-----------:|")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"| {name:56} | {median:7.2f} | {SIZE / 1e6 / median:4.0f} | {floor / median:9.0%} |")


if __name__ == "__main__":
    main()
