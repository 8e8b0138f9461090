"""The stack's health gate: `docker compose up` and compose's healthchecks on the host
(`files/host/health_gate.sh`), then the `http_checks` from the control node, as a person would check a service.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from typing import Any

from pyinfra.api import FunctionCommand, StringCommand, operation

from ..report import report
from . import deadline
from .failure import failed
from .stack_push import stack_locked

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # terminal control, but tab


def gate_outcome(project: str, timeout: int, services: list[str], records: list[str]) -> tuple[list[str], str]:
    """The services the health gate found failing (only names of SERVICES count) and the failure's message,
    from its RECORDS (stdout lines): compose's own message where `up` itself failed (`up-failed` lines, control
    characters shown escaped), else the services not healthy within TIMEOUT."""
    failing = [line.split(" ", 1)[1] for line in records if line.startswith("failing ")]
    unhealthy = [name for name in failing if name in services]
    said = [CONTROL.sub(lambda match: repr(match[0])[1:-1], line.removeprefix("up-failed ").strip())
            for line in records if line.startswith("up-failed ")]
    if said:
        return unhealthy, f"stack {project}: docker compose up failed: {' / '.join(said)[-1500:]}"
    return unhealthy, (f"stack {project}: not healthy within {timeout}s: " + (", ".join(unhealthy) or "see the log"))


class HealthGate(StringCommand):
    """`files/host/health_gate.sh`: up, wait for health. What it finds failing goes to the report; only
    names of this project's services count."""

    def __init__(self, project: str, compose_dir: str, profiles: list[str], timeout: int, services: list[str]):
        super().__init__(stack_locked(compose_dir, "health_gate.sh", compose_dir, project, timeout, ",".join(profiles)))
        self.project, self.timeout, self.services = project, timeout, services

    def execute(self, state, host, connector_arguments):
        # the gate waits up to `timeout` for health: its deadline is that much longer than other commands'
        arguments: Any = {**connector_arguments, **deadline.arguments(host, "commands", self.timeout)}
        status, output = super().execute(state, host, arguments)
        record = report[host.name]
        lines, expired = deadline.stopped_at(output.stdout_lines)
        unhealthy, message = gate_outcome(self.project, self.timeout, self.services, lines)
        message = f"stack {self.project}: the health gate {expired}" if expired else message
        if record.stack is not None:
            record.stack.health = "healthy" if status else "unhealthy"
            record.stack.unhealthy = unhealthy
        if not status:
            record.pending = message
        return status, output


def check_url(template: str, address: str) -> str:
    """An `http_checks` entry for one host: `{host}` is the address the control node reaches it at."""
    return template.replace("{host}", f"[{address}]" if ":" in address else address)


class _FirstAnswer(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, never followed: it would send the control node to any address the service
    names, and let a broken service pass by redirecting to one that answers 2xx."""

    def redirect_request(self, *args, **kwargs):
        return None  # urllib then raises the 3xx as an HTTPError


def problem_of(code: int, location: str | None) -> str:
    """What is wrong with an answer CODE (LOCATION: its Location header), or '' for a 2xx."""
    if 200 <= code < 300:
        return ""
    if 300 <= code < 400:
        where = CONTROL.sub(lambda match: repr(match[0])[1:-1], location or "nowhere")
        return f"HTTP {code}: redirected to {where} (not followed: a check passes on a 2xx answer only)"
    return f"HTTP {code}"


def ask(url: str, deadline: float) -> str:
    """'' once URL's own answer is 2xx before DEADLINE (asked every 2 s, no proxy, no redirect followed), else
    the last problem."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _FirstAnswer())
    while True:
        try:
            with opener.open(url, timeout=5) as response:
                problem = problem_of(response.status, response.headers.get("Location"))
        except urllib.error.HTTPError as error:
            problem = problem_of(error.code, error.headers.get("Location") if error.headers else None)
        except (OSError, ValueError) as error:
            problem = str(getattr(error, "reason", None) or error)
        if not problem:
            return ""
        if time.monotonic() + 2 > deadline:
            return problem
        time.sleep(2)


def _checks_pass(state, host, project: str, templates: list[str], timeout: int) -> bool:
    """The `http_checks`, made by the control node against the host, as a person would check the service."""
    address = host.data.get("ssh_hostname") or host.name
    deadline = time.monotonic() + timeout
    failing = [f"check {url}: {problem}" for url in (check_url(template, address) for template in templates)
               if (problem := ask(url, deadline))]
    record = report[host.name]
    if not failing:
        return True
    if record.stack is not None:
        record.stack.health = "unhealthy"
        record.stack.unhealthy = failing
    return failed(host, f"stack {project}: " + ", ".join(failing))


@operation(is_idempotent=False)
def converge_stack(project: str, compose_dir: str, profiles: list[str], timeout: int, checks: list[str],
                   services: list[str]):
    """Compose recreates exactly the services whose config hash changed; then the health gate: compose's
    healthchecks on the host, then the HTTP checks from the control node."""
    yield HealthGate(project, compose_dir, profiles, timeout, services)
    if checks:
        yield FunctionCommand(_checks_pass, (project, checks, timeout), {})
