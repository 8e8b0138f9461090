"""Roll the deploy out across a fleet: canary host(s) first, then batches, stopping once more hosts
have failed than the failure threshold allows; hosts not yet reached are left untouched and named, with
the `--limit` flags that resume the rollout with them.

    mlstack rollout INVENTORY [--canary N] [--batch N|P%] [--max-fail N|P%] [--pause SECONDS]
                              [--limit HOST|GROUP ...] [--exclude HOST|GROUP ...] [pyinfra options, e.g. --data k=v]

The flags default to the rollout_* settings. `--limit` and `--exclude` take host names, globs and group
names, as pyinfra reads them; the rollout applies them itself, and each batch is one
`pyinfra INVENTORY mlstack.deploy.converge -y --limit <host> ...` run (pyinfra's own --fail-percent
applies only within a run). The end-of-run table shows, per host, the env, the models, the stack and the
outcome, from the deploy's per-host report (report.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config import ConfigError, HostConfig
from ..validation import validate_host
from .runner import DEPLOY, DeployRun, limit_args, run_deploy


def share(hosts: int, amount: str) -> int:
    """AMOUNT ("5" or "25%") of HOSTS hosts: a count as it is, a percentage rounded down."""
    return math.floor(hosts * int(amount[:-1]) / 100) if amount.endswith("%") else int(amount)


def batches(hosts: list[str], canary: int, batch: str) -> list[list[str]]:
    """HOSTS in rollout order: the canary hosts alone, then batches of a count or a percentage of the fleet."""
    size = max(1, math.ceil(len(hosts) * int(batch[:-1]) / 100)) if batch.endswith("%") else int(batch)
    groups = [hosts[:canary]] if canary else []
    rest = hosts[canary:]
    groups += [rest[start:start + size] for start in range(0, len(rest), size)]
    return [group for group in groups if group]


@dataclass
class HostOutcome:
    """One row of the tables: what the deploy's report says of a host."""

    env: str = ""
    models: list[str] = field(default_factory=list)
    stack: str = ""
    result: str = "not reached"
    gpus: str = ""  # "GPUs: 1× NVIDIA H100 80GB HBM3, driver 580.159.04; gate checked: env-… (CUDA 13.0)"; "" without
    env_store: list[str] = field(default_factory=list)  # what the host's env store held amiss

    @classmethod
    def from_record(cls, record: dict) -> HostOutcome:
        env = record.get("env")
        env_text = "" if not env else (f"{env['before'] or 'none'} → {env['after']}" if env["action"] != "none"
                                        else env["after"])
        models = [f"{model['repo_id']}@{model['revision']} ({model['commit'][:12]})"
                  + (f": {model['bytes_to_send'] / 1e6:.1f} MB sent" if model["action"] == "transfer" else "")
                  for model in record.get("models", [])]
        return cls(env_text, models, stack_text(record), "FAILED" if record.get("result") == "failed" else "ok",
                   gpu_text(record), [f"ML env store: {note}" for note in (env or {}).get("store", [])])

    def details(self) -> list[str]:
        """The lines under the host's row: its GPUs and the gate, what its env store held amiss, then its models."""
        return ([self.gpus] if self.gpus else []) + self.env_store + self.models


def gpu_text(record: dict) -> str:
    """The host's GPUs (count, models, driver) and the GPU gate's last result; "" on a CPU host."""
    gpus = record.get("gpus") or []
    if not gpus:
        return ""
    text = f"GPUs: {len(gpus)}× {', '.join(sorted({gpu['name'] for gpu in gpus}))}, driver {gpus[0]['driver']}"
    gate = record.get("gate")
    if gate:
        text += f"; gate {gate['result']}: {gate['env']} (CUDA {gate['cuda'] or 'none'})"
    return text


def stack_text(record: dict) -> str:
    """The stack column: what changed and the health gate, then why the host failed if it did."""
    failure, stack = record.get("failure"), record.get("stack")
    if failure and failure["cause"] in ("unreachable", "locked"):
        return f"{failure['cause']}: {failure['message']}"
    text = ""
    if stack:
        changed = [f"{name} ({service['reason']})" for name, service in stack["services"].items()
                   if service["action"] != "keep"]
        text = f"{stack['project']}: " + (", ".join(changed) if changed else "no change")
        if stack["health"] == "unhealthy":
            return text + "; unhealthy: " + (", ".join(stack["unhealthy"]) or "see the log")
    if failure:
        text += ("; " if text else "") + f"failed at {failure['step']}: {failure['message']}"
    return text


def failed_hosts(run: DeployRun, batch: list[str]) -> list[str]:
    """Hosts of BATCH that failed, by the report; all of them when the run wrote none (it crashed) or
    stopped before executing (an error while planning)."""
    if not run.report or not run.executed:
        return list(batch)
    return sorted(name for name in batch if run.report.get(name, {}).get("result") != "ok")


def inventory_hosts(inventory: str, limit: Sequence[str], pyinfra_args: Sequence[str] = (),
                    exclude: Sequence[str] = ()) -> tuple[list[str], HostConfig]:
    """Host names in inventory order, narrowed by LIMIT and EXCLUDE (host names, globs or group names, as
    pyinfra's --limit and --exclude read them), and the first host's validated config, with the
    `--data key=value` overrides among PYINFRA_ARGS applied as pyinfra applies them."""
    from pyinfra.api import State  # pyinfra's CLI machinery, only for this
    from pyinfra.context import ctx_inventory, ctx_state
    from pyinfra_cli.cli import _apply_inventory_exclude, _apply_inventory_limit
    from pyinfra_cli.inventory import make_inventory
    from pyinfra_cli.util import parse_cli_arg

    pairs = [pyinfra_args[i + 1] for i, arg in enumerate(pyinfra_args[:-1]) if arg == "--data"]
    overrides = {key: parse_cli_arg(value) for key, _, value in (pair.partition("=") for pair in pairs)}
    with ctx_state.use(State()):
        loaded = make_inventory(inventory, cwd=".", override_data=overrides)
        with ctx_inventory.use(loaded):
            chosen = _apply_inventory_exclude(loaded, _apply_inventory_limit(loaded, limit), exclude)
        hosts = list(loaded)
    names = [h.name for h in hosts if chosen is None or h in chosen]
    if not names:
        raise SystemExit(f"no host of {inventory} is left by --limit {' '.join(limit) or '-'} "
                         f"--exclude {' '.join(exclude) or '-'}")
    first = hosts[[h.name for h in hosts].index(names[0])]
    config, problems = validate_host(first.name, first.data.dict())
    if problems or config is None:
        raise SystemExit(ConfigError(problems))
    return names, config


def print_table(order: list[str], outcomes: dict[str, HostOutcome]) -> None:
    print(f"\n{'host':14} {'result':12} {'ML env':44} stack / models")
    for name in order:
        outcome = outcomes[name]
        print(f"{name:14} {outcome.result:12} {outcome.env[:44]:44} {outcome.stack}")
        for line in outcome.details():
            print(f"{'':14} {'':12} {'':44} {line}")


def _amount(zero: bool):
    """An argparse type: a count of hosts or a percentage ("25%"), 0 allowed only where ZERO says."""
    def parse(text: str) -> str:
        number = text.removesuffix("%")
        if not number.isdigit() or (text.endswith("%") and int(number) > 100) or (not zero and int(number) == 0):
            raise argparse.ArgumentTypeError(f"expected a number of hosts{' (0 or more)' if zero else ''} or a "
                                             f"percentage such as 25%, not {text!r}")
        return str(int(number)) + ("%" if text.endswith("%") else "")
    return parse


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of hosts, 0 or more, not {text!r}")
    return int(text)


def parse_options(argv: list[str] | None, prog: str) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("inventory")
    parser.add_argument("--limit", action="append", default=[], help="host names, globs or groups (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], help="host names, globs or groups (repeatable)")
    parser.add_argument("--canary", type=_count, help="hosts deployed alone first (rollout_canary)")
    parser.add_argument("--batch", type=_amount(zero=False), help="hosts per batch: N or P%% (rollout_batch)")
    parser.add_argument("--max-fail", type=_amount(zero=True),
                        help="failed hosts tolerated before stopping: N or P%% of the hosts (rollout_max_failures)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to wait between batches")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m tasks.fleet.rollout", function: str = DEPLOY,
         env: dict | None = None) -> int:
    """Roll FUNCTION (the deploy; or the rollback, tasks/rollback.py) out with ENV in its environment."""
    options, pyinfra_args = parse_options(argv, prog)
    order, config = inventory_hosts(options.inventory, options.limit, pyinfra_args, options.exclude)
    canary = config.rollout_canary if options.canary is None else options.canary
    allowed = share(len(order), options.max_fail or str(config.rollout_max_failures))  # 10% of 8 hosts: 0
    threshold = "--max-fail" if options.max_fail else "rollout_max_failures"
    outcomes = {name: HostOutcome() for name in order}
    failures: list[str] = []
    plan = batches(order, canary, options.batch or config.rollout_batch)
    for number, group in enumerate(plan, start=1):
        label = "canary" if number == 1 and canary else f"batch {number - (1 if canary else 0)}"
        if number > 1 and options.pause:
            print(f"rollout: pausing {options.pause:g}s before {label}", flush=True)
            time.sleep(options.pause)
        print(f"rollout: {label}: {', '.join(group)}", flush=True)
        run = run_deploy("-y", *limit_args(group), *pyinfra_args, inventory=options.inventory, echo=True,
                         function=function, env=env)
        failed = failed_hosts(run, group)
        for name in group:
            outcomes[name] = HostOutcome.from_record(run.report[name]) if name in run.report else HostOutcome()
            outcomes[name].result = "FAILED" if name in failed else "ok"
        failures += failed
        if len(failures) > allowed:
            untouched = [name for later in plan[number:] for name in later]
            print(f"rollout: stopped after {label}: {len(failures)} host(s) failed ({', '.join(failures)}), "
                  f"more than {threshold}={allowed}; not reached: {', '.join(untouched) or 'none'}",
                  file=sys.stderr)
            if untouched:
                print(f"rollout: to resume with them: {prog} {options.inventory} {' '.join(limit_args(untouched))}",
                      file=sys.stderr)
            break
    print_table(order, outcomes)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
