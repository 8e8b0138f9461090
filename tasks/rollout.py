"""Roll the deploy out across a fleet: canary host(s) first, then batches, stopping once more hosts
have failed than `rollout_max_failures` allows; hosts not yet reached are left untouched.

    .venv/bin/python -m tasks.rollout inventory/<fleet>.py [pyinfra options, e.g. --limit 'gpu-*' --data k=v]

Each batch is one `pyinfra ... deploy.py -y --limit <batch>` run (pyinfra's own --fail-percent
applies only within a run, and only with -y). The end-of-run table shows, per host, the env id,
the models, the stack and the outcome, as the deploy reported them.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatch

from tasks.config import ConfigError, HostConfig, validate_host
from tasks.runner import DeployRun, limit_args, run_deploy

STATUS_LINE = re.compile(r"^\s*\[(?P<host>[^\]]+)\] (?P<what>ML env|model|stack)\b(?P<rest>.*)$")
FAILING_SERVICE = re.compile(r"^\s*\[(?P<host>[^\]]+)\] last log lines of (?P<service>\S+):$")
# Hosts the deploy never worked on: pyinfra could not connect, or another deploy held the lock.
NOT_DEPLOYED = re.compile(r"^\s*\[(?P<host>[^\]]+)\] (?:Could not connect \((?P<unreachable>.*)\)|Deploy lock: (?P<locked>.*))$")


def batches(hosts: list[str], canary: int, batch: str) -> list[list[str]]:
    """HOSTS in rollout order: the canary hosts alone, then batches of a count or a percentage of the fleet."""
    size = max(1, math.ceil(len(hosts) * int(batch[:-1]) / 100)) if batch.endswith("%") else int(batch)
    groups = [hosts[:canary]] if canary else []
    rest = hosts[canary:]
    groups += [rest[start:start + size] for start in range(0, len(rest), size)]
    return [group for group in groups if group]


@dataclass
class HostOutcome:
    env: str = ""
    models: list[str] = field(default_factory=list)
    stack: str = ""
    result: str = "not reached"


def failed_hosts(run: DeployRun, batch: list[str]) -> list[str]:
    """Hosts of BATCH that failed: from pyinfra's results, or all of them when it produced none."""
    results = (run.payload or {}).get("results")
    if not results:
        return list(batch) if run.returncode else []
    failed = set(results.get("failed_hosts", []))
    failed.update(name for op in results.get("operations", []) for name in op.get("error", []))
    return sorted(failed & set(batch))


def read_outcomes(run: DeployRun, outcomes: dict[str, HostOutcome]) -> None:
    """The per-host lines the deploy logs at plan time (ML env, model, stack) into OUTCOMES."""
    for line in run.output.splitlines():
        failing = FAILING_SERVICE.match(line)
        if failing and failing["host"] in outcomes:
            outcomes[failing["host"]].stack += f"; unhealthy: {failing['service']}"
        skipped = NOT_DEPLOYED.match(line)
        if skipped and skipped["host"] in outcomes:
            outcomes[skipped["host"]].stack = (f"unreachable: {skipped['unreachable']}" if skipped["unreachable"]
                                               else f"locked: {skipped['locked']}")
        match = STATUS_LINE.match(line)
        if not match or match["host"] not in outcomes:
            continue
        outcome, rest = outcomes[match["host"]], match["rest"].removeprefix(":").strip()
        if match["what"] == "ML env":
            outcome.env = rest
        elif match["what"] == "model":
            outcome.models.append(rest)
        else:
            outcome.stack = rest


def inventory_hosts(inventory: str, limit: list[str], pyinfra_args: list[str] = ()) -> tuple[list[str], HostConfig]:
    """Host names in inventory order (narrowed by --limit patterns) and the first host's validated config,
    with the `--data key=value` overrides among PYINFRA_ARGS applied as pyinfra applies them."""
    from pyinfra.api import State  # noqa: PLC0415 (pyinfra's CLI machinery, only for this)
    from pyinfra.context import ctx_state  # noqa: PLC0415
    from pyinfra_cli.inventory import make_inventory  # noqa: PLC0415
    from pyinfra_cli.util import parse_cli_arg  # noqa: PLC0415

    pairs = [pyinfra_args[i + 1] for i, arg in enumerate(pyinfra_args[:-1]) if arg == "--data"]
    overrides = {key: parse_cli_arg(value) for key, _, value in (pair.partition("=") for pair in pairs)}
    with ctx_state.use(State()):
        hosts = list(make_inventory(inventory, cwd=".", override_data=overrides))
    names = [h.name for h in hosts if not limit or any(fnmatch(h.name, pattern) for pattern in limit)]
    if not names:
        raise SystemExit(f"rollout: no host of {inventory} matches --limit {' '.join(limit)}")
    first = hosts[[h.name for h in hosts].index(names[0])]
    config, problems = validate_host(first.name, first.data.dict())
    if problems:
        raise SystemExit(ConfigError(problems))
    return names, config


def print_table(order: list[str], outcomes: dict[str, HostOutcome]) -> None:
    print(f"\n{'host':14} {'result':12} {'ML env':44} stack / models")
    for name in order:
        outcome = outcomes[name]
        print(f"{name:14} {outcome.result:12} {outcome.env[:44]:44} {outcome.stack}")
        for model in outcome.models:
            print(f"{'':14} {'':12} {'':44} {model}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("inventory")
    parser.add_argument("--limit", action="append", default=[], help="host name patterns, as pyinfra's --limit")
    options, pyinfra_args = parser.parse_known_args(argv)
    order, config = inventory_hosts(options.inventory, options.limit, pyinfra_args)
    canary, allowed = config.rollout_canary, config.rollout_max_failures
    outcomes = {name: HostOutcome() for name in order}
    failures: list[str] = []
    plan = batches(order, canary, config.rollout_batch)
    for number, group in enumerate(plan, start=1):
        label = "canary" if number == 1 and canary else f"batch {number - (1 if canary else 0)}"
        print(f"rollout: {label}: {', '.join(group)}", flush=True)
        run = run_deploy("-y", *limit_args(group), *pyinfra_args, inventory=options.inventory, echo=True)
        read_outcomes(run, outcomes)
        failed = failed_hosts(run, group)
        for name in group:
            outcomes[name].result = "FAILED" if name in failed else "ok"
        failures += failed
        if len(failures) > allowed:
            untouched = [name for later in plan[number:] for name in later]
            print(f"rollout: stopped after {label}: {len(failures)} host(s) failed ({', '.join(failures)}), "
                  f"more than rollout_max_failures={allowed}; not reached: {', '.join(untouched) or 'none'}",
                  file=sys.stderr)
            break
    print_table(order, outcomes)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
