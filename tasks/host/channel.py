"""Commands on an exec channel of the deploy's own SSH connection, wrapped as pyinfra wraps its own
(`--sudo`, `_sudo_user`, `_su_user`, `_doas`…): for what pyinfra's run_shell_command cannot do, which
is streaming stdin (uploads) and holding a process as long as the connection lasts (the lock).
"""

from __future__ import annotations

import inspect

from pyinfra.api import StringCommand
from pyinfra.api.arguments import pop_global_arguments
from pyinfra.connectors.util import make_unix_command, make_unix_command_for_host

WRAPPING = set(inspect.signature(make_unix_command).parameters) - {"command"}  # sudo, su, env, chdir…


def open_channel(state, host, command: str, arguments: dict | None = None):
    """A channel running COMMAND on HOST with ARGUMENTS (an operation's connector arguments; by default
    the host's and the run's own, e.g. `--sudo`); None when the host is not reached over SSH."""
    client = getattr(host.connector, "client", None)
    if client is None:
        return None
    if arguments is None:
        arguments, _ = pop_global_arguments(state, host, {})
    wrapping = {key: value for key, value in arguments.items() if key in WRAPPING}
    wrapped = make_unix_command_for_host(state, host, StringCommand(command), **wrapping)
    channel = client.get_transport().open_session()
    channel.exec_command(wrapped.get_raw_value())
    return channel
