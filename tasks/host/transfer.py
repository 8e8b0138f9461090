"""Large uploads to a host: progress the user sees, a room check before a byte is sent, and a failure
that fails only that host and says why."""

from __future__ import annotations

import io
import shlex
import time
from pathlib import Path

from pyinfra import host
from pyinfra.api import StringCommand
from pyinfra.api.command import FileUploadCommand

from tasks.host.failure import failed

PROGRESS_EVERY = 2.0  # seconds between upload progress lines
PROGRESS_FROM = 1_000_000  # smaller files arrive too fast for progress to say anything
DISK_MARGIN = 256 * 2**20  # bytes a transfer leaves free on the host beyond what it writes


def room_problem(free: int, needed: int, contents: str, where: str = "") -> str | None:
    """Why a host with FREE bytes cannot take NEEDED more (plus the margin), or None:
    checked before any byte is sent."""
    if free >= needed + DISK_MARGIN:
        return None
    return (f"not enough disk space{where}: {free / 1e6:.0f} MB free, {(needed + DISK_MARGIN) / 1e6:.0f} MB needed "
            f"({contents} and a margin); nothing was sent")


class UploadProgress(io.RawIOBase):
    """The artifact as a file object that logs how much of it the SFTP upload has read."""

    def __init__(self, path: Path, label: str):
        self.path, self.label, self.file = path, label, None
        self.total = path.stat().st_size
        self.sent, self.last = 0, 0.0

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.file = self.file or self.path.open("rb")
        self.sent = self.file.seek(offset, whence)
        return self.sent

    def read(self, size: int = -1) -> bytes:
        self.file = self.file or self.path.open("rb")
        data = self.file.read(size)
        self.sent += len(data)
        now = time.monotonic()
        if data and self.total >= PROGRESS_FROM and (now - self.last >= PROGRESS_EVERY or self.sent == self.total):
            self.last = now
            host.log(f"{self.label}: {self.sent / 1e6:.1f} / {self.total / 1e6:.1f} MB sent "
                     f"({100 * self.sent // max(self.total, 1)}%)")
        return data

    def close(self) -> None:
        if self.file:
            self.file.close()
        super().close()


class RoomCheckedUpload(FileUploadCommand):
    """An upload whose failure fails only its host and says why: how much room is left where it was
    writing (SFTP reports a full disk as a bare "Failure"; under sudo the file passes through the
    host's temp dir first), or that the connection was lost."""

    def execute(self, state, host, connector_arguments) -> bool:
        label = getattr(self.src, "label", self.dest)
        try:
            if super().execute(state, host, dict(connector_arguments)):
                return True
            failure = "the upload failed"
        except OSError as error:
            failure = f"the upload failed ({error})"
        except EOFError:  # paramiko's word for a dead connection; pyinfra would abort every host's run on it
            return failed(host, f"{label}: the connection was lost during the upload; nothing was installed, "
                                "the next run sends it again")
        places = {str(Path(self.dest).parent)}
        if any(connector_arguments.get(key) for key in ("_sudo", "_su_user", "_doas", "_dzdo")):
            places.add(str(Path(self.remote_temp_filename or self.dest).parent))
        quoted = " ".join(shlex.quote(place) for place in sorted(places))
        _, output = host.run_shell_command(StringCommand(f"df -Pk -- {quoted} | awk 'NR > 1 {{print $4, $6}}'"),
                                           **connector_arguments)
        room = []
        for line in output.stdout_lines:
            free_kb, _, mount = line.partition(" ")
            room.append(f"No space left on device on {mount}" if int(free_kb) < 1024
                        else f"{int(free_kb) / 1e3:.0f} MB free on {mount}")
        return failed(host, f"{label}: {failure}: {', '.join(room) or 'free space unknown'}; nothing was installed, "
                            "the next run sends it again")
