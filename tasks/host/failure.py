"""Failing one host: the one way, whatever found the problem.

- Input the operator controls (inventory data, settings, what the endpoint says about a configured
  model) is checked before any host changes; a problem there raises (`ConfigError`, `ModelError`)
  and stops the whole run, since every host would fail alike.
- A problem of one host found while planning: raise `HostProblem` inside a `@step` (or call
  `fail_host`). That host fails with the message before any of its operations runs, so nothing
  on it changes; the other hosts go on.
- A problem of one host found while executing (inside a function command or an upload):
  `return failed(host, message)`.

Each way logs the message in red and gives it to the report as the failure's cause.
"""

from __future__ import annotations

import functools

from pyinfra import host, logger
from pyinfra.context import ctx_host, ctx_state

from ..report import report


class HostProblem(Exception):
    """This host cannot converge; the message says what was found and what to do."""


def failed(host, message: str) -> bool:
    """Report MESSAGE as the cause of this host's failure; returns False, the failing status of a command."""
    host.log_styled(message, fg="red", log_func=logger.error)
    report[host.name].pending = message
    return False


def fail_host(step: str, message: str) -> None:
    """Fail this host while planning: none of its operations will run (pyinfra's failed hosts are left
    out of the execution), a dry run reports it too. If it was the last host left, pyinfra stops the
    run ("No hosts remaining!") after each host's message was logged."""
    host.log_styled(f"{host.name}: {message}", fg="red", log_func=logger.error)
    report[host.name].fail("step", message, step)
    ctx_state.get().fail_hosts({ctx_host.get()})


def step(name: str):
    """pyinfra's `@deploy(NAME)`, where a `HostProblem` raised inside fails this host only: the function
    then returns None and the host's later steps see that.

    What pyinfra's `@deploy` does, but for working out its global arguments (`_sudo`, `_if`, ...) anew on
    every call, which costs ~5 ms of `typing` evaluation a call (seven steps a host): a step takes none, so
    the deploy's own (or none) carry on unchanged, as the operations inside would read them anyway."""

    def decorate(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            outer = host.current_deploy_kwargs
            with host.deploy(name, kwargs=dict(outer) if outer else None, data=None):  # type: ignore[arg-type]
                try:
                    return function(*args, **kwargs)
                except HostProblem as problem:
                    fail_host(name, str(problem))
                    return None

        return run

    return decorate
