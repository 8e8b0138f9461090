"""`mlstack status` and `mlstack logs`: read-only views of a fleet, one pyinfra run each (`--dry`, the packaged
functions of tasks/status.py), read back from the report; pyinfra's log is shown only when the run wrote no
report.

    mlstack status INVENTORY [--json] [--limit HOST|GROUP ...] [--exclude ...] [pyinfra options]
    mlstack logs INVENTORY SERVICE [--since T] [--tail N] [--timestamps] [--limit ...] [--exclude ...] [...]

Exit status: 0 when every targeted host was read, 1 when any could not be (unreachable, a part of its probe
failed; for logs, compose failed there), 2 on a usage error. Drift does not change the status: read it from
the table or the JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass

from .runner import DeployRun, run_deploy

STATUS_FUNCTION = "mlstack.status.mlstack_status"  # tasks/status.py, as pyinfra imports it
LOGS_FUNCTION = "mlstack.status.mlstack_logs"
DRIFT = {  # the drift words, most pressing first: a host is given the first that applies
    "unknown": "the host could not be read (unreachable, or a part of its probe failed)",
    "none": "no release is recorded on the host: never deployed, or deployed before releases were kept",
    "degraded": "a service of the current release is missing, not running, or not healthy",
    "modified": "the compose project on the host differs from the current release's: its files or .env",
    "ok": "the current release runs as recorded, every service running and healthy",
}
LOGS_OPTIONS = "MLSTACK_LOGS"  # the environment variable that hands `mlstack_logs` its options (JSON)
SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # compose's service names, not starting with - or .
SINCE = re.compile(r"[0-9][0-9A-Za-z:.+-]{0,39}")  # 42m, 2h30m, 2026-12-07, 2026-12-07T04:00:00Z, a unix time
TAIL = re.compile(r"all|[0-9]{1,9}")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # terminal control, but tab


def printable(text: str) -> str:
    """TEXT with terminal control characters shown escaped: what a host says cannot move a terminal's cursor."""
    return CONTROL.sub(lambda match: repr(match[0])[1:-1], text)


@dataclass(frozen=True)
class LogOptions:
    service: str
    since: str = ""
    tail: str = ""
    timestamps: bool = False

    def problems(self) -> list[str]:
        """Why these options cannot be passed to compose (they come from the command line: untrusted)."""
        checks = ((SERVICE_NAME, self.service, "a compose service name (letters, digits, '.', '_', '-')", False),
                  (SINCE, self.since, "a time as compose reads it: 42m, 2h, 2026-12-07T04:00:00Z", True),
                  (TAIL, self.tail, "a number of lines or 'all'", True))
        return [f"expected {what}, not {value!r}" for pattern, value, what, optional in checks
                if not (optional and value == "") and not pattern.fullmatch(value)]


def unread_status(error: str) -> dict:
    """The status of a host that could not be read at all (unreachable, or stopped before it was read)."""
    return {"drift": "unknown", "problems": [], "errors": [error], "release": None, "releases": [], "env": None,
            "envs": [], "models": [], "services": {}, "gpus": [], "docker_gpus": "",
            "lock": {"held": None, "holder": ""}}


def host_order(names) -> list[str]:
    """Host names as people count them: host2 before host10."""
    return sorted(names, key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])


def failure_text(record: dict) -> str:
    """Why a host was not read: `unreachable: …`, or what failed there."""
    failure = record.get("failure")
    if not failure:
        return "not read"
    return failure["message"] if failure["cause"] == "step" else f"{failure['cause']}: {failure['message']}"


def statuses(run: DeployRun) -> dict[str, dict]:
    """host -> its status (tasks/status.py), in host order; a host that could not be read at all gets the status
    of an unread host, with why."""
    found = {}
    for name in host_order(run.report):
        record = run.report[name]
        found[name] = record.get("status") or unread_status(failure_text(record))
    return found


def service_text(name: str, service: dict) -> str:
    if service["state"] == "running" and service["health"]:
        return f"{name} {service['health']}"
    return f"{name} {service['state']}" + (f" ({service['health']})" if service["health"] else "")


def lock_text(lock: dict) -> str:
    return "unknown" if lock["held"] is None else "held" if lock["held"] else "free"


def model_text(model: dict) -> str:
    commit = model["commit"][:12] if model["commit"] else "none"
    return f"{model['repo_id']}@{model['revision'][:12]} {commit}" + ("" if model["present"] else " (missing)")


def gpus_text(status: dict) -> str:
    gpus = status["gpus"]
    if not gpus:
        return ""
    names = ", ".join(sorted({gpu["name"] for gpu in gpus}))
    return f"GPUs: {len(gpus)}× {names}, driver {gpus[0]['driver']}" + (
        f" (docker: {status['docker_gpus']})" if status["docker_gpus"] else "")


def status_table(found: dict[str, dict]) -> str:
    """The table for people: a row per host, then the lines under it (release, models, GPUs, problems)."""
    width = max([len(name) for name in found] + [4])
    lines = [f"{'host':{width}}  {'drift':9} {'release':20}  {'activated':20}  {'env':20}  {'lock':7}  services"]
    for name, status in found.items():
        release = status["release"] or {}
        services = ", ".join(service_text(service, state) for service, state in status["services"].items())
        lines.append(f"{name:{width}}  {status['drift']:9} {release.get('id') or '-':20}  "
                     f"{release.get('activated') or '-':20}  {status['env'] or '-':20}  "
                     f"{lock_text(status['lock']):7}  {services or '-'}")
        under = []
        if status["lock"]["holder"]:
            under.append(f"deploy lock {lock_text(status['lock'])}: {status['lock']['holder']}")
        if release:
            kept = [other for other in status["releases"] if other != release["id"]]
            under.append(f"created {release['created'] or '?'} by {release['control_node'] or '?'}; "
                         f"kept: {', '.join(kept) or 'none'}")
        if status["models"]:
            under.append("models: " + ", ".join(model_text(model) for model in status["models"]))
        if gpus_text(status):
            under.append(gpus_text(status))
        under += [f"{status['drift']}: {problem}" for problem in status["problems"] if status["drift"] != "none"]
        under += [f"not read: {error}" for error in status["errors"]]
        lines += [f"{'':{width}}  {line}" for line in under]
    counts = {word: sum(status["drift"] == word for status in found.values()) for word in DRIFT}
    lines.append(f"\nstatus: {len(found)} host(s): " + ", ".join(f"{word} {count}" for word, count in counts.items()
                                                                   if count))
    return "\n".join(lines)


def prefixed(host_name: str, lines: list[str], width: int = 0) -> list[str]:
    """Each of LINES prefixed by the host's name (`host1 | …`), terminal control characters shown escaped."""
    return [f"{host_name:{width}} | {printable(line)}" for line in lines]


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog="Other options go to pyinfra as they are (--data k=v, -v).")
    parser.add_argument("inventory", help="a pyinfra inventory file, e.g. inventory.py")
    parser.add_argument("--limit", action="append", default=[], help="host names, globs or groups (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], help="host names, globs or groups (repeatable)")
    return parser


def _targets(options: argparse.Namespace) -> list[str]:
    return [*(arg for pattern in options.limit for arg in ("--limit", pattern)),
            *(arg for pattern in options.exclude for arg in ("--exclude", pattern))]


def _no_report(command: str, run: DeployRun) -> int:
    sys.stderr.write(run.output[-3000:])
    print(f"mlstack {command}: pyinfra stopped before any host was read (see its log above)", file=sys.stderr)
    return 1


def status_main(argv: list[str], prog: str = "mlstack status") -> int:
    parser = _parser(prog, "read-only: what each host runs (release, env, models, services, GPUs, drift, lock)")
    parser.add_argument("--json", action="store_true", help="a JSON object host -> status on stdout")
    options, pyinfra_args = parser.parse_known_args(argv)
    run = run_deploy("--dry", *_targets(options), *pyinfra_args, inventory=options.inventory,
                     function=STATUS_FUNCTION)
    if not run.report:
        return _no_report("status", run)
    found = statuses(run)
    print(json.dumps(found, indent=2) if options.json else status_table(found))
    unread = [name for name, record in run.report.items() if record.get("result") != "ok"]
    if unread:
        print(f"mlstack status: could not read {', '.join(host_order(unread))}", file=sys.stderr)
    return 1 if unread else 0


def logs_main(argv: list[str], prog: str = "mlstack logs") -> int:
    parser = _parser(prog, "read-only: one service's `docker compose logs` on each host, each line prefixed by "
                           "the host's name")
    parser.add_argument("service", help="the compose service (put it right after the inventory)")
    parser.add_argument("--since", default="", help="as compose reads it: 42m, 2h, 2026-12-07T04:00:00Z")
    parser.add_argument("--tail", default="", help="lines from the end of each container's log (default: all)")
    parser.add_argument("--timestamps", action="store_true", help="each line with its time")
    options, pyinfra_args = parser.parse_known_args(argv)
    logs = LogOptions(options.service, options.since, options.tail, options.timestamps)
    if logs.problems():
        parser.error("; ".join(logs.problems()))  # exits 2
    run = run_deploy("--dry", *_targets(options), *pyinfra_args, inventory=options.inventory,
                     env={LOGS_OPTIONS: json.dumps(logs.__dict__)}, function=LOGS_FUNCTION)
    if not run.report:
        return _no_report("logs", run)
    order = host_order(run.report)
    width = max(len(name) for name in order)
    failed = []
    for name in order:
        record = run.report[name]
        if record.get("result") == "ok" and record.get("status"):
            lines = prefixed(name, record["status"]["logs"], width)
            if lines:
                print("\n".join(lines), flush=True)
        else:
            failed.append(name)
            print(prefixed(name, [f"mlstack logs: {failure_text(record)}"], width)[0], file=sys.stderr, flush=True)
    return 1 if failed else 0
