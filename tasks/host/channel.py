"""Commands on the deploy's own SSH connection, wrapped as pyinfra wraps its own (`--sudo`,
`_sudo_user`, `_su_user`, `_doas`…): for what pyinfra's run_shell_command cannot do, which is
streaming stdin (uploads) and holding a process as long as the connection lasts (the lock).

Large uploads go through OpenSSH (`ssh_command`) where it can stand in for pyinfra's connection, as
pyinfra's own `rsync` does: its ciphers run in a process of their own, at about twice the speed of
paramiko's in the deploy's one Python process (`make bench-transfer`).
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Mapping
from typing import Any

from pyinfra.api import StringCommand
from pyinfra.api.arguments import pop_global_arguments
from pyinfra.connectors.util import make_unix_command, make_unix_command_for_host

WRAPPING = set(inspect.signature(make_unix_command).parameters) - {"command"}  # sudo, su, env, chdir…
HOST_KEY_CHECKING = {"yes", "no", "accept-new", "off"}  # what OpenSSH takes without asking


def _arguments(state, host, arguments: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """ARGUMENTS, or by default the host's and the run's own connector arguments (e.g. `--sudo`)."""
    return arguments if arguments is not None else pop_global_arguments(state, host, {})[0]


def _wrapped(state, host, command: str, arguments: Mapping[str, Any] | None) -> str:
    """COMMAND as pyinfra would run it on HOST with ARGUMENTS (by default the host's and the run's own)."""
    wrapping = {key: value for key, value in _arguments(state, host, arguments).items() if key in WRAPPING}
    return make_unix_command_for_host(state, host, StringCommand(command), **wrapping).get_raw_value()


def open_channel(state, host, command: str, arguments: Mapping[str, Any] | None = None):
    """A channel running COMMAND on HOST with ARGUMENTS (an operation's connector arguments; by default
    the host's and the run's own, e.g. `--sudo`); None when the host is not reached over SSH."""
    client = getattr(host.connector, "client", None)
    if client is None:
        return None
    channel = client.get_transport().open_session()
    channel.exec_command(_wrapped(state, host, command, arguments))
    return channel


def ssh_command(state, host, command: str, arguments: Mapping[str, Any] | None = None) -> list[str] | None:
    """The argv of `ssh` running COMMAND on HOST as the deploy's connection reaches it: its host name,
    user, port, key, config file, known hosts and host key checking, agent and key lookup settings; or
    None where OpenSSH cannot stand in for that connection: another connector, custom paramiko arguments,
    or a password (of the login, the key or sudo), which ssh would ask for or take in its argv."""
    data = getattr(host.connector, "data", None)
    if getattr(host.connector, "client", None) is None or data is None or not shutil.which("ssh"):
        return None
    arguments = _arguments(state, host, arguments)
    checking, known_hosts = data["ssh_strict_host_key_checking"] or "accept-new", data["ssh_known_hosts_file"] or ""
    if data["ssh_password"] or data["ssh_key_password"] or data["ssh_paramiko_connect_kwargs"] \
            or arguments.get("_sudo_password") or arguments.get("_su_password") \
            or checking not in HOST_KEY_CHECKING or '"' in known_hosts:
        return None
    argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ControlMaster=no", "-o", f"StrictHostKeyChecking={checking}"]
    for flag, value in (("-F", data["ssh_config_file"]), ("-p", data["ssh_port"]), ("-i", data["ssh_key"]),
                        ("-l", data["ssh_user"])):
        if value:
            argv += [flag, str(value)]
    if known_hosts:
        argv += ["-o", f'UserKnownHostsFile="{known_hosts}"']  # an -o value is a config line: quoted
    if not data["ssh_look_for_keys"]:
        argv += ["-o", "IdentitiesOnly=yes"]
    if not data["ssh_allow_agent"]:
        argv += ["-o", "IdentityAgent=none"]
    return [*argv, "--", data["ssh_hostname"] or host.name, _wrapped(state, host, command, arguments)]
