"""Failing one host: the one way, whatever found the problem.

- Input the operator controls (inventory data, settings, what the endpoint says about a configured
  model) is checked before any host changes; a problem there raises (`ConfigError`, `ModelError`)
  and stops the whole run, since every host would fail alike.
- A problem of one host found while planning: raise `HostProblem` inside a `@step`. That host
  fails with the message (its remaining operations are skipped); the other hosts go on.
- A problem of one host found while executing (inside a function command or an upload):
  `return failed(host, message)`.

Each way logs the message in red and gives it to the report as the failure's cause.
"""

from __future__ import annotations

import functools

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, deploy, operation

from tasks.report import report


class HostProblem(Exception):
    """This host cannot converge; the message says what was found and what to do."""


def failed(host, message: str) -> bool:
    """Report MESSAGE as the cause of this host's failure; returns False, the failing status of a command."""
    host.log_styled(message, fg="red", log_func=logger.error)
    report[host.name].pending = message
    return False


def fail_host(name: str, message: str) -> None:
    """Fail this host with MESSAGE: recorded now, at plan time (a dry run reports it too); the operation
    NAME fails at execution, so the host's later operations are skipped."""
    report[host.name].fail("step", message, name)
    _fail(name=name, message=message)


@operation(is_idempotent=False)
def _fail(message: str):
    yield FunctionCommand(lambda state, host: failed(host, message), (), {})


def step(name: str):
    """pyinfra's `@deploy(NAME)`, where a `HostProblem` raised inside fails this host only: the function
    then returns None and the host's later steps see that."""

    def decorate(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except HostProblem as problem:
                message = f"{host.name}: {problem}"
                host.log(f"{name}: {problem}")
                fail_host(f"{name} check", message)
                return None

        return deploy(name)(run)

    return decorate
