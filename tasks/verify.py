"""Read-only check of a fleet against what the deploy would make it, with a table per host.

    .venv/bin/python -m tasks.verify inventory/<fleet>.py [--hashes] [--limit 'gpu-*'] [--data k=v ...]

It is the deploy's own dry run (`pyinfra … deploy.py --dry`): a dry run builds, sends and changes
nothing, and every change it would make is drift — directories and owners, the active env, each
model snapshot (sizes; with --hashes every file's hash), the compose files and every service
running and healthy. It also runs the import check of each host's active env. Exit status 1 on
any drift or failure, 0 when every host matches.
"""

from __future__ import annotations

import argparse
import sys

from tasks.rollout import HostOutcome, inventory_hosts, read_outcomes
from tasks.runner import DeployRun, limit_args, run_deploy

CONCERNS = {"Host directories": "directories", "ML env": "ML env", "Models": "models", "Stack": "stack"}


def drift_by_host(run: DeployRun, hosts: list[str]) -> dict[str, list[str]]:
    """host -> the concerns whose operations the dry run would execute there."""
    drift: dict[str, list[str]] = {name: [] for name in hosts}
    for op in (run.payload or {}).get("plan") or []:
        concern = CONCERNS.get(op["name"].split(" | ", 1)[0], op["name"])
        for name in op["hosts_with_change"]:
            if concern not in drift.setdefault(name, []):
                drift[name].append(concern)
    return drift


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("inventory")
    parser.add_argument("--hashes", action="store_true", help="hash every model file on the hosts")
    parser.add_argument("--limit", action="append", default=[], help="host name patterns, as pyinfra's --limit")
    options, pyinfra_args = parser.parse_known_args(argv)
    hosts, _ = inventory_hosts(options.inventory, options.limit, pyinfra_args)
    checks = ["--data", "ml_env_check_active=true", *(["--data", "model_verify_hashes=true"] if options.hashes else [])]
    run = run_deploy("--dry", *limit_args(hosts), *checks, *pyinfra_args, inventory=options.inventory)
    if not run.payload:
        sys.stderr.write(run.output[-3000:])
        print("verify: the dry run did not complete (see its log above)", file=sys.stderr)
        return 1
    outcomes = {name: HostOutcome() for name in hosts}
    read_outcomes(run, outcomes)
    drift = drift_by_host(run, hosts)
    print(f"{'host':14} {'state':8} {'drift':28} {'ML env':44} stack")
    for name in hosts:
        state = "DRIFT" if drift[name] else "ok"
        outcome = outcomes[name]
        print(f"{name:14} {state:8} {', '.join(drift[name]) or '-':28} {outcome.env:44} {outcome.stack}")
        for model in outcome.models:
            print(f"{'':14} {'':8} {'':28} {'':44} {model}")
    drifted = [name for name in hosts if drift[name]]
    print(f"\nverify: {len(hosts) - len(drifted)}/{len(hosts)} host(s) match"
          + (f"; drift on {', '.join(drifted)}" if drifted else ""))
    return 1 if drifted or run.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
