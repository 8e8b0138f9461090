"""The deploy's report: one typed record per host, written as JSON to the file the caller names in
`MLSTACK_REPORT`. The fleet tools (rollout, verify) read it; the human log is for people only.

The deploy fills each record as it plans (env before/after, models and commits, services and why
they change) and as it runs (health, the failure's cause: unreachable, locked or the step that
failed). The file is written once, whole, when the pyinfra process ends.

    {"version": 1, "executed": true, "hosts": {"gpu-01": {"result": "ok", "env": {...}, ...}, ...}}

`executed` is false when the run stopped after planning: a dry run, or a run that an error stopped.
"""

from __future__ import annotations

import atexit
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .control.caches import atomic_write

REPORT_FILE = "MLSTACK_REPORT"  # the environment variable naming the file
VERSION = 1

# The values the fleet tools (tasks/fleet/) read, exactly as the report writes them.
Result = Literal["ok", "failed", "not run"]  # "ok": planned, and executed without failure if the run executed
Cause = Literal["unreachable", "locked", "step"]
EnvAction = Literal["install", "switch", "none"]  # install: upload, check, switch; switch: on the host already
ModelAction = Literal["transfer", "repair", "none"]  # repair: metadata only
ServiceAction = Literal["create", "recreate", "keep"]
Health = Literal["healthy", "unhealthy", "not checked"]
DockerGpus = Literal["runtime", "cdi", ""]  # how the host's docker gives containers GPUs; "": it does not


@dataclass
class Failure:
    cause: Cause
    message: str
    step: str = ""  # the operation that failed, for cause "step"


@dataclass
class EnvOutcome:
    before: str | None  # the active env id before the run
    after: str  # the env id this run makes active
    action: EnvAction
    store: list[str] = field(default_factory=list)  # what the probe found amiss in the host's env store, mended


@dataclass
class ModelOutcome:
    repo_id: str
    revision: str
    commit: str
    bytes_to_send: int
    action: ModelAction


@dataclass
class ServiceOutcome:
    action: ServiceAction
    reason: str = ""


@dataclass
class StackOutcome:
    project: str
    images: list[str]  # the built images its services run (tags)
    services: dict[str, ServiceOutcome] = field(default_factory=dict)
    health: Health = "not checked"
    unhealthy: list[str] = field(default_factory=list)  # services the health gate found failing


@dataclass
class HostRecord:
    result: Result = "not run"
    failure: Failure | None = None
    changes: list[str] = field(default_factory=list)  # concerns with planned changes: drift, in a dry run
    env: EnvOutcome | None = None
    models: list[ModelOutcome] = field(default_factory=list)
    stack: StackOutcome | None = None
    gpus: list[dict] = field(default_factory=list)  # as the probe read them (tasks/host/gpu_checks.py `Gpu`)
    docker_gpus: DockerGpus = ""
    gate: dict | None = None  # the GPU gate's checks and results, once a GPU gate runs
    planned: bool = False  # the deploy planned every step for this host
    status: dict | None = None  # what `mlstack status` or `mlstack logs` read on the host (tasks/status.py)
    prune: dict | None = None  # what `mlstack prune` keeps and removes on the host (tasks/prune.py)
    pending: str = field(default="", repr=False)  # the message of a failure not yet tied to its step

    def changed(self, concern: str) -> None:
        if concern not in self.changes:
            self.changes.append(concern)

    def fail(self, cause: Cause, message: str, step: str = "") -> None:
        if self.failure is None:  # the first failure is the cause; what follows it is consequence
            self.failure = Failure(cause, message, step)


class Report:
    """The records of this pyinfra run, written to $MLSTACK_REPORT when the process ends."""

    def __init__(self):
        self.records: dict[str, HostRecord] = {}
        self.started = False

    def __getitem__(self, host_name: str) -> HostRecord:
        return self.records.setdefault(host_name, HostRecord())

    def start(self) -> None:
        """Follow this run's operations (and connections, when called before pyinfra connects); idempotent:
        deploy.py calls it, and so does tasks/fleet/report_hook.py, which pyinfra runs before connecting."""
        from pyinfra.context import ctx_state  # only inside a pyinfra run

        if self.started or not os.environ.get(REPORT_FILE):
            return
        self.started = True
        state = ctx_state.get()
        atexit.register(self.write, Path(os.environ[REPORT_FILE]), state)
        if hasattr(state, "callback_handlers"):  # the state is initialised: we are past the connections
            state.add_callback_handler(_callbacks())
            return
        initialise = state.init  # pyinfra runs config files before State.init, which sets up the callbacks

        def init_then_follow(*args, **kwargs):
            initialise(*args, **kwargs)
            state.add_callback_handler(_callbacks())

        state.init = init_then_follow

    def write(self, path: Path, state) -> None:
        from pyinfra.api.state import StateStage  # only inside a pyinfra run

        for host in state.inventory:
            if not state.is_host_in_limit(host):
                continue
            record = self[host.name]
            connected = host in state.activated_hosts  # `host.connected` is False again once the run disconnects
            if record.failure is None and not connected:
                record.fail("unreachable", "pyinfra could not connect")
            elif record.failure is None and not record.planned:
                record.fail("step", "the run stopped before this host was planned (see the log)")
            record.result = "failed" if record.failure else "ok" if connected else "not run"
        hosts = {name: {key: value for key, value in asdict(record).items() if key != "pending"}
                 for name, record in sorted(self.records.items())}
        executed = state.current_stage >= StateStage.Execute
        atomic_write(path, json.dumps({"version": VERSION, "executed": executed, "hosts": hosts}, indent=2))


report = Report()


def _callbacks():
    """What follows this run's connections and operations; pyinfra is imported only inside a run (the fleet tools
    read reports without it: `mlstack status` waits for their start-up)."""
    from pyinfra.api.state import BaseStateCallback

    class Callbacks(BaseStateCallback):
        @staticmethod
        def host_connect_error(state, host, error) -> None:
            report[host.name].fail("unreachable", str(error.args[0] if error.args else error))

        @staticmethod
        def operation_host_error(state, host, op_hash, retry_count: int = 0, max_retries: int = 0) -> None:
            if retry_count < max_retries:
                return
            record = report[host.name]
            step = ", ".join(state.get_op_meta(op_hash).names) or "an operation"
            record.fail("step", record.pending or f"{step} failed (its output is in the log)", step)

    return Callbacks()


def read_report(path: Path) -> dict:
    """The report as the fleet tools read it back; {} when the run wrote none (it crashed)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if data.get("version") == VERSION else {}
