"""One deploy at a time on a host.

The lock is a `flock` held on the host by a process whose stdin is a channel of this deploy's own
SSH connection: it lasts exactly as long as the connection, so a deploy that ends, crashes or is
killed never leaves a stale lock behind, and no timeout has to guess whether a holder is alive. It is
taken with the deploy's own privilege (`--sudo`, `_sudo_user`, `_su_user`), in a directory only that
user can write (`files/host/deploy_lock.sh`), so no other local user can hold it.
"""

from __future__ import annotations

import getpass
import os
import socket
import time

from pyinfra import host, state

from .. import validation
from ..report import report
from . import deadline
from .channel import open_channel
from .failure import fail_host
from .programs import program

LOCK_DIR = "/run/mlstack"  # /run: root's alone, and gone at reboot with every holder
LOCKED = "locked"
HELD = "held by "
ANSWER_TIMEOUT = 60  # seconds: a host that does not answer the lock program fails instead of hanging the run

_channels: dict[str, object] = {}  # host name -> the open channel that keeps its lock


def holder() -> str:
    """Who takes the lock, as the next deploy's error shows it (no secret: user, machine, pid, time)."""
    return (f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} "
            f"since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")


def lock_command(who: str) -> str:
    """Take the lock without waiting (files/host/deploy_lock.sh): LOCKED, then held until stdin closes;
    or who holds it."""
    return program("deploy_lock.sh", LOCK_DIR, who)


def first_line(channel) -> str:
    data = b""
    while b"\n" not in data:
        chunk = channel.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").partition("\n")[0].strip()


def hold_deploy_lock() -> bool:
    """Take this host's deploy lock for the rest of the run; when another deploy holds it, fail the
    host with who holds it (its other operations are skipped) and return False. Once it is held, every
    other command of the host has its deadline (deadline.py); the lock's own has none: it lasts the run."""
    config = validation.host_config(host)
    own = deadline.apply(state, host, config.host_command_timeout, config.host_transfer_timeout)
    arguments = {**own, **deadline.arguments(host, "none")}
    channel = open_channel(state, host, lock_command(holder()), arguments)
    if channel is None:  # not an SSH connection (e.g. @local): nothing to tie the lock to
        return True
    channel.settimeout(ANSWER_TIMEOUT)
    try:
        answer = first_line(channel)
    except TimeoutError:
        answer = f"no answer within {ANSWER_TIMEOUT}s"
    if answer == LOCKED:
        _channels[host.name] = channel  # closed with the connection: the holder's `cat` ends, the lock goes
        return True
    channel.close()
    why = (f"another deploy holds this host's lock ({answer.removeprefix(HELD)}): wait for it to end, then run again"
           if answer.startswith(HELD) else f"cannot take the deploy lock in {LOCK_DIR}: {answer or 'no answer'}")
    host.log(f"Deploy lock: {why}")
    report[host.name].fail("locked", why)
    fail_host("Deploy lock", why)
    return False
