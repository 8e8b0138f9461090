"""Uploads to a host: streamed by OpenSSH with the connection's settings (or, where it cannot stand in
for the connection, over an exec channel of it: tasks/host/channel.py) into a
program on the host (`files/host/receive_file.sh`), run with the deploy's sudo/su settings and, in
a directory a non-root user owns, as that user (`as_owner`). No temporary copy at a predictable name,
no second write on the host; progress the user sees; a room check before a byte is sent; and a
failure that fails only that host and says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shlex
import subprocess
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

import paramiko
from pyinfra.api import StringCommand
from pyinfra.api.command import PyinfraCommand

from . import deadline
from .channel import open_channel, ssh_command
from .failure import failed
from .programs import program

if TYPE_CHECKING:
    from ..control.env_store import Stream

PROGRESS_EVERY = 2.0  # seconds between upload progress lines
PROGRESS_FROM = 1_000_000  # smaller files arrive too fast for progress to say anything
DISK_MARGIN = 256 * 2**20  # bytes a transfer leaves free on the host beyond what it writes
CHUNK = 1 << 20
# This run's mark on the temporary names it writes on hosts (`NAME-<mark>`): a chain of commands that a
# killed connection left running on a host (still unpacking, still checking) keeps to its own names, so it
# can never rename the next run's half-written file into place. MARKED matches the mark, or none (older runs).
RUN_MARK = os.urandom(4).hex()
MARKED = r"(?:-[0-9a-f]{8})?"
LOST = -1  # the exit status of an upload whose connection went away
# From this size on an upload goes through OpenSSH: twice paramiko's speed (`make bench-transfer`) pays for
# the new connection it opens (0.2 s on the rehearsal); smaller files (model configs, the project) take the
# connection that is open already.
OPENSSH_FROM = 32 * 2**20
# The chain after the upload (checks, unpack, rename) may have been under way, and may still finish on its
# own names: only the next run's plan knows what the host holds.
LOST_WORDS = "the connection was lost during the upload or the host's work on it"
AFTER_LOSS = "the next run completes what is missing"


def room_problem(free: int, needed: int, contents: str, where: str = "") -> str | None:
    """Why a host with FREE bytes cannot take NEEDED more (plus the margin), or None:
    checked before any byte is sent."""
    if free >= needed + DISK_MARGIN:
        return None
    return (f"not enough disk space{where}: {free / 1e6:.0f} MB free, {(needed + DISK_MARGIN) / 1e6:.0f} MB needed "
            f"({contents} and a margin); nothing was sent")


def as_owner(uid: int, gid: int, command: str) -> str:
    """COMMAND run as uid:gid when that is not root's: in a directory a user owns, root must not follow
    the links that user can plant there; as that user, a link leads nowhere the user could not write.
    A root owner with another group keeps root's rights, and what it creates gets that group."""
    if (uid, gid) == (0, 0):
        return command
    return f"setpriv --reuid={uid} --regid={gid} --clear-groups -- sh -c {shlex.quote(command)}"


class StreamedUpload(PyinfraCommand):
    """Send SOURCE (a control-node file, bytes, or a stream made as it is sent: `open()` gives a reader and
    its size) to DEST on the host, written as a new file with MODE
    by `files/host/receive_file.sh` as uid:gid (see `as_owner`); then THEN runs there (checks, a rename)."""

    def __init__(self, source: Path | bytes | Stream, label: str, dest: str, owner: tuple[int, int] = (0, 0),
                 mode: int = 0o600, then: str = "", receiver: str = ""):
        super().__init__()
        self.source, self.label, self.dest = source, label, dest
        receive = receiver or program("receive_file.sh", dest, f"{mode:04o}")  # RECEIVER: another reader of stdin
        self.receive = as_owner(*owner, f"{receive} && {then}" if then else receive)

    def __repr__(self):  # op hashes and logs: never the data (bytes may be a .env)
        return f"StreamedUpload({self.label}, {self.dest})"

    def _open(self) -> tuple[BinaryIO, int]:
        if isinstance(self.source, bytes):
            return io.BytesIO(self.source), len(self.source)
        if isinstance(self.source, Path):
            return self.source.open("rb"), self.source.stat().st_size
        return self.source.open()

    def execute(self, state, host, connector_arguments) -> bool:
        connector_arguments = {**connector_arguments, **deadline.arguments(host, "transfers")}
        try:
            source, total = self._open()
        except OSError as error:
            return failed(host, f"{self.label}: cannot read it on the control node ({error}); nothing was sent")
        with source:
            argv = ssh_command(state, host, self.receive, dict(connector_arguments)) if total >= OPENSSH_FROM else None
            outcome = (self._by_openssh(argv, source, total, host) if argv
                       else self._by_channel(state, host, dict(connector_arguments), source, total))
        if isinstance(outcome, str):
            return failed(host, f"{self.label}: {outcome}")
        status, said = outcome
        if status == 0:
            return True
        if status == LOST:
            why = f" ({said[-1]})" if said else ""
            return failed(host, f"{self.label}: {LOST_WORDS}{why}; {AFTER_LOSS}")
        return failed(host, f"{self.label}: the upload failed ({said[-1] if said else f'exit status {status}'}); "
                            f"{self._room(state, host, connector_arguments)}nothing was installed, "
                            "the next run sends it again")

    def _by_openssh(self, argv: list[str], source, total: int, host) -> tuple[int, list[str]]:
        """Stream SOURCE into `ssh` (ARGV); its exit status (LOST: ssh's own 255) and what the host said."""
        with tempfile.TemporaryFile() as said:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=said)
            stdin = process.stdin
            assert stdin is not None  # PIPE
            with contextlib.suppress(OSError):  # a 1 MiB pipe: a chunk per write, not 16 waits for ssh (gevent)
                fcntl.fcntl(stdin.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)
            try:
                self._send(source, total, stdin.write, host)
                stdin.close()
            except (BrokenPipeError, ValueError):
                pass  # the program on the host (or ssh) ended first: its status says why
            status = process.wait()
            said.seek(0)
            lines = said.read(65536).decode(errors="replace").strip().splitlines()
        return (LOST if status == 255 else status), lines

    def _by_channel(self, state, host, arguments: dict, source, total: int) -> tuple[int, list[str]] | str:
        """Stream SOURCE over an exec channel of the deploy's paramiko connection (where OpenSSH cannot
        stand in for it); its exit status (LOST: none came) and what the host said, or why not."""
        channel = None
        try:
            channel = open_channel(state, host, self.receive, arguments)
            if channel is None:
                return "uploads need an SSH connection to the host"
            self._send(source, total, channel.sendall, host)
            channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException) as error:
            # paramiko's words for a dead connection (pyinfra would abort every host's run on them),
            # unless the program on the host ended first and closed its end: then its status says why
            if channel is None or not channel.exit_status_ready():
                return f"{LOST_WORDS} ({error}); {AFTER_LOSS}"
        status = channel.recv_exit_status()
        said = channel.recv_stderr(65536).decode(errors="replace").strip().splitlines()
        channel.close()  # not left open until the connection ends
        return status, said

    def _send(self, source, total: int, write, host) -> None:
        started = last = time.monotonic()
        sent = 0
        while chunk := source.read(CHUNK):
            write(chunk)
            sent += len(chunk)
            if total >= PROGRESS_FROM and (time.monotonic() - last >= PROGRESS_EVERY or sent == total):
                last = time.monotonic()
                rate = f" in {last - started:.1f} s, {sent / 1e6 / max(last - started, 1e-3):.0f} MB/s" \
                    if sent == total else ""
                host.log(f"{self.label}: {sent / 1e6:.1f} / {total / 1e6:.1f} MB sent "
                         f"({100 * sent // max(total, 1)}%){rate}")

    def _room(self, state, host, connector_arguments) -> str:
        """How much room is left where DEST lives (a full disk is the usual cause of a failed upload)."""
        where = shlex.quote(str(PurePosixPath(self.dest).parent))
        _, output = host.run_shell_command(StringCommand(f"df -Pk -- {where} | awk 'NR > 1 {{print $4, $6}}'"),
                                           **connector_arguments)
        for line in output.stdout_lines:
            free_kb, _, mount = line.partition(" ")
            if free_kb.isdigit():
                return (f"No space left on device on {mount}; " if int(free_kb) < 1024
                        else f"{int(free_kb) / 1e3:.0f} MB free on {mount}; ")
        return ""
