"""Every host command has a deadline (tasks/host/deadline.py, files/host/deadline.sh, run here with /bin/sh):
at it, the command's whole process group ends, stopped processes and one blocked on a FIFO included, the
status says so, and the host probe names the part that was running, with the setting to raise."""

import os
import shlex
import subprocess
import time
import weakref
from types import SimpleNamespace

from pyinfra.api import FactBase

from tasks.host import deadline
from tasks.host.deadline import EXPIRED, Deadline
from tasks.host.probe import HostProbe, PartFailure, ProbePart

SETTING = "host_command_timeout"
RAISE = f"raise {SETTING} if this host needs longer"


def under_deadline(command: str, seconds: int) -> tuple[subprocess.CompletedProcess, float]:
    """COMMAND run as pyinfra runs it with the deadline as its shell (`SHELL -c COMMAND`); and how long it took."""
    started = time.monotonic()
    result = subprocess.run(["/bin/sh", "-c", f"{Deadline(seconds, SETTING).shell('sh')} -c {shlex.quote(command)}"],
                            capture_output=True, text=True, timeout=seconds + deadline.KILL_AFTER + 20)
    return result, time.monotonic() - started


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_stopped_command_and_its_children_end_at_the_deadline_with_the_setting_named(tmp_path):
    pids = tmp_path / "pids"
    result, took = under_deadline(f"sleep 300 & echo $! >{pids}; echo $$ >>{pids}; kill -STOP $$; echo never", 2)
    assert result.returncode == EXPIRED and 2 <= took < 2 + deadline.KILL_AFTER
    assert result.stderr.strip().endswith(f"stopped at its deadline, after 2 s ({SETTING}), and its processes on "
                                          f"the host killed: {RAISE}")
    assert deadline.stopped_at(result.stdout.splitlines()) == ([""], f"stopped at its deadline, after 2 s ({SETTING}): "
                                                                      f"{RAISE}")
    time.sleep(0.5)
    assert [pid for pid in map(int, pids.read_text().split()) if alive(pid)] == []


def test_a_command_that_ends_in_time_keeps_its_status_and_output():
    result, _ = under_deadline("echo out; echo err >&2; exit 124", 20)  # its own 124, well before the deadline
    assert (result.returncode, result.stdout, result.stderr) == (124, "out\n", "err\n")
    assert deadline.stopped_at(result.stdout.splitlines()) == (["out"], "")


class ReadsFifo(FactBase):
    def command(self, fifo: str) -> str:
        return f"echo before; cat -- {shlex.quote(fifo)}"  # blocks: nothing writes the FIFO

    def process(self, output):
        return output


class Prints(FactBase):
    def command(self) -> str:
        return "echo fine"

    def process(self, output):
        return output


def test_a_probe_stopped_at_its_deadline_names_the_part_that_was_running(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    parts = (ProbePart("first", Prints), ProbePart("hashes", ReadsFifo, {"fifo": str(tmp_path / "fifo")}),
             ProbePart("last", Prints))
    probe = HostProbe()
    result, took = under_deadline(probe.command(parts=parts), 2)
    assert result.returncode == EXPIRED and took < 2 + deadline.KILL_AFTER
    values = probe.process(result.stdout.splitlines())
    assert values == {"first": ["fine"],
                      "hashes": PartFailure(f"stopped at its deadline, after 2 s ({SETTING}): {RAISE}"),
                      "last": PartFailure("not read: the probe stopped at its deadline before it")}


class FakeState:
    """Stands for pyinfra's State: the deadlines are kept per run, by a weak reference to it."""


def test_each_kind_of_command_gets_its_deadline_in_the_hosts_own_shell(monkeypatch):
    state = FakeState()
    host = SimpleNamespace(name="gpu-01", current_deploy_kwargs=None, state=state)
    monkeypatch.setattr(deadline, "_applied", weakref.WeakKeyDictionary())
    monkeypatch.setattr(deadline, "pop_global_arguments", lambda state, host, kwargs: ({"_shell_executable": "bash"},))
    assert deadline.arguments(host, "commands") == {}  # not applied: commands run as pyinfra runs them
    deadline.apply(state, host, 600, 7200)
    commands, transfers = Deadline(600, SETTING), Deadline(7200, "host_transfer_timeout")
    assert host.current_deploy_kwargs == {"_if": [], "_shell_executable": commands.shell("bash")}
    deadline.apply(state, host, 600, 7200)  # again (another entry point): still the host's own shell inside
    assert host.current_deploy_kwargs["_shell_executable"] == commands.shell("bash")
    assert deadline.arguments(host, "transfers") == {"_shell_executable": transfers.shell("bash")}
    assert deadline.arguments(host, "commands", 180) == {"_shell_executable": Deadline(780, SETTING).shell("bash")}
    later = FakeState()  # a second run in the same process, with its own settings, takes those
    again = SimpleNamespace(name="gpu-01", current_deploy_kwargs=None, state=later)
    deadline.apply(later, again, 60, 120)
    assert deadline.arguments(again, "commands") == {"_shell_executable": Deadline(60, SETTING).shell("bash")}
    assert deadline.arguments(host, "none") == {"_shell_executable": "bash"}
