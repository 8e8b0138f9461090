"""Every host command has a deadline, so that one host (a probe blocked on a FIFO its owner planted, a process
someone stopped) fails alone instead of holding the whole run, and its lock, forever.

pyinfra plans and runs the hosts side by side but waits for all of them; its own `_timeout` only stops
waiting: the channel stays open and the process on the host runs on. So the deadline is kept on the host:
each command runs under `files/host/deadline.sh` (as pyinfra's shell, `_shell_executable`, which pyinfra puts
after sudo or su and before the command, for operations and facts alike), where `timeout` ends the command's
whole process group, stopped processes included, with KILL at the latest, and says which deadline it was
and the setting to raise. pyinfra names the operation that failed; the host probe names its part.

The deadline of a host's commands is `host_command_timeout`; uploads (the stream and what reads it on the
host) have `host_transfer_timeout`; the health gate `host_command_timeout` plus `health_timeout`. The deploy
lock alone has none: it is held for the whole run, by design (lock.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyinfra.api.arguments import pop_global_arguments

from .programs import program

KILL_AFTER = 10  # seconds from TERM to KILL: time to remove what the command was writing
EXPIRED = 124  # the status of a command stopped at its deadline
MARK = "@@mlstack-deadline "  # "@@mlstack-deadline SECONDS SETTING": deadline.sh's last line on stdout then


@dataclass(frozen=True)
class Deadline:
    seconds: int
    setting: str  # the setting that sets it, for the message

    def shell(self, shell: str) -> str:
        """pyinfra's `_shell_executable` that runs each command in SHELL under this deadline."""
        return program("deadline.sh", self.seconds, KILL_AFTER, self.setting, shell)

    def longer(self, seconds: int) -> Deadline:
        return Deadline(self.seconds + seconds, self.setting)


@dataclass(frozen=True)
class HostDeadlines:
    shell: str  # the shell the host's commands run in (pyinfra's, or the inventory's `_shell_executable`)
    commands: Deadline
    transfers: Deadline
    arguments: Mapping[str, Any]  # the host's own global arguments, before these deadlines


def host_deadlines(shell: str, command_seconds: int, transfer_seconds: int,
                   arguments: Mapping[str, Any]) -> HostDeadlines:
    return HostDeadlines(shell, Deadline(command_seconds, "host_command_timeout"),
                         Deadline(transfer_seconds, "host_transfer_timeout"), arguments)


def stopped_at(lines: list[str]) -> tuple[list[str], str]:
    """A command's stdout LINES less deadline.sh's line, and what that line says ("" when the command was not
    stopped at its deadline)."""
    for number in range(len(lines) - 1, -1, -1):
        if lines[number].startswith(MARK):
            seconds, _, setting = lines[number][len(MARK):].partition(" ")
            return lines[:number], f"stopped at its deadline, after {seconds} s ({setting}): raise {setting} " \
                                   "if this host needs longer"
    return lines, ""


# the run's state -> host name -> its deadlines, once `apply` ran for it: a second run in the same process
# (another state) takes its own settings, never the first run's
_applied: weakref.WeakKeyDictionary[Any, dict[str, HostDeadlines]] = weakref.WeakKeyDictionary()


def apply(state, host, command_seconds: int, transfer_seconds: int) -> Mapping[str, Any]:
    """From now on, every command of HOST in this run (its operations, facts and uploads) has its deadline:
    set as the deploy's own argument, which pyinfra's packaged deploys and each step pass on. Returns the host's
    own global arguments (`--sudo`, ...) as they were before (pyinfra reads ~30 data keys for them)."""
    hosts = _applied.setdefault(state, {})
    if host.name not in hosts:
        own = pop_global_arguments(state, host, {})[0]
        hosts[host.name] = host_deadlines(own["_shell_executable"] or "sh", command_seconds, transfer_seconds, own)
    kwargs = host.current_deploy_kwargs or {"_if": []}  # pyinfra combines the `_if`s of nested deploys
    mine = hosts[host.name]
    host.current_deploy_kwargs = {**kwargs, "_shell_executable": mine.commands.shell(mine.shell)}
    return mine.arguments


def arguments(host, kind: str, extra_seconds: int = 0) -> Mapping[str, Any]:
    """The connector arguments that give a command of HOST the deadline of KIND ("transfers", "commands",
    "none") plus EXTRA_SECONDS; none when `apply` did not run for HOST."""
    applied = _applied.get(host.state, {}).get(host.name)
    if applied is None:
        return {}
    if kind == "none":
        return {"_shell_executable": applied.shell}
    deadline: Deadline = getattr(applied, kind)
    return {"_shell_executable": deadline.longer(extra_seconds).shell(applied.shell)}
