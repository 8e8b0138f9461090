"""Run the deploy (`pyinfra ... --json`) and read back pyinfra's results and the deploy's per-host report:
for the fleet tools, the rehearsal, tests and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..report import REPORT_FILE, read_report

DEPLOY = "mlstack.deploy.converge"  # the deploy (tasks/deploy.py), as pyinfra imports it
REPORT_HOOK = Path(__file__).with_name("report_hook.py")
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))


@dataclass
class DeployRun:
    returncode: int
    output: str  # pyinfra's log (stderr)
    seconds: float
    payload: dict = field(default_factory=dict)
    report: dict[str, dict] = field(default_factory=dict)  # host -> its record (tasks/report.py)
    executed: bool = False  # the run got past planning (not a dry run, not stopped by an error)

    @property
    def operations(self) -> list[dict]:
        results = self.payload.get("results") or {}
        return results.get("operations", [])

    def per_host(self) -> dict[str, Counter]:
        """host -> Counter(changed=, no_change=, error=) over every operation; a host the run planned with no
        operation (nothing to change) counts none."""
        hosts: dict[str, Counter] = {name: Counter() for name in self.report}
        for op in self.operations:
            for outcome, key in (("changed", "success"), ("no_change", "no_change"), ("error", "error")):
                for host_name in op[key]:
                    hosts.setdefault(host_name, Counter())[outcome] += 1
        return hosts

    def changed_operations(self) -> list[tuple[str, list[str]]]:
        return [(op["name"], op["success"]) for op in self.operations if op["success"]]


def limit_args(hosts: list[str]) -> list[str]:
    """pyinfra's --limit takes one pattern per flag (a comma is not a separator: "a,b" matches no host)."""
    return [arg for name in hosts for arg in ("--limit", name)]


def run_deploy(*args: str, inventory: str = "inventory/rehearsal.py", env: dict | None = None,
               echo: bool = False, function: str = DEPLOY, wrap: tuple[str, ...] = ()) -> DeployRun:
    """`pyinfra INVENTORY mlstack.deploy.converge ARGS --json` in the current directory (where pyinfra also
    looks for group_data/), with its report; ECHO streams pyinfra's log to our stderr. FUNCTION: another
    packaged function that fills the report (tasks/status.py). WRAP: a command pyinfra runs under (a tracer)."""
    with tempfile.TemporaryDirectory(prefix="mlstack-report-") as folder:
        report_file = Path(folder) / "report.json"
        run = _run_pyinfra([*wrap, PYINFRA, "--config", str(REPORT_HOOK), inventory, function, *args, "--json"],
                           {**os.environ, **(env or {}), REPORT_FILE: str(report_file)}, echo)
        written = read_report(report_file)
        run.report, run.executed = written.get("hosts", {}), written.get("executed", False)
    return run


def _run_pyinfra(argv: list[str], env: dict, echo: bool) -> DeployRun:
    started = time.monotonic()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_lines: list[str] = []
    assert process.stdout is not None and process.stderr is not None  # both PIPE
    stdout_pipe, stderr_pipe = process.stdout, process.stderr

    def read_log() -> None:
        for line in stderr_pipe:
            log_lines.append(line)
            if echo:
                sys.stderr.write(line)

    # Both pipes drained at once: a large JSON result must not block pyinfra while we read its log.
    log_reader = threading.Thread(target=read_log)
    log_reader.start()
    stdout = stdout_pipe.read()
    log_reader.join()
    process.wait()
    try:
        payload = json.loads(stdout) if stdout.strip() else {}
    except json.JSONDecodeError:
        payload = {}
    return DeployRun(process.returncode, "".join(log_lines), time.monotonic() - started, payload)


def print_host_table(run: DeployRun, title: str) -> None:
    print(f"\n{title} ({run.seconds:.1f}s, exit {run.returncode})")
    print(f"  {'host':10} {'changed':>8} {'no change':>10} {'error':>6}")
    for host_name, counts in sorted(run.per_host().items()):
        print(f"  {host_name:10} {counts['changed']:>8} {counts['no_change']:>10} {counts['error']:>6}")
