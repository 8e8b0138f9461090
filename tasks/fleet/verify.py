"""Read-only check of a fleet against what the deploy would make it, with a table per host.

    .venv/bin/python -m tasks.fleet.verify inventory/<fleet>.py [--hashes] [--limit 'gpu-*'] [--data k=v ...]

It is the deploy's own dry run (`pyinfra … deploy.py --dry`): a dry run sends and changes nothing on the
hosts (it builds the env on the builder only when this control node never built its requirements: an
env's id names what pip installs), and every change it would make is drift — directories and owners, the
active env (with --hashes every object of the env store, and every env's tree against its manifest: extra,
missing and changed entries), each model snapshot (sizes; with --hashes
every file's hash), the compose files and every service running and healthy. It also runs the import
check of each host's active env. What drifted is read from the deploy's per-host report
(tasks/report.py). Exit status 1 on any drift or failure, 0 when every host matches.
"""

from __future__ import annotations

import argparse
import sys

from .rollout import HostOutcome, inventory_hosts
from .runner import limit_args, run_deploy


def main(argv: list[str] | None = None, prog: str = "python -m tasks.fleet.verify") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("inventory")
    parser.add_argument("--hashes", action="store_true",
                        help="hash every model file and env object on the hosts, and check every env's tree")
    parser.add_argument("--limit", action="append", default=[], help="host names, globs or groups (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], help="host names, globs or groups (repeatable)")
    options, pyinfra_args = parser.parse_known_args(argv)
    hosts, _ = inventory_hosts(options.inventory, options.limit, pyinfra_args, options.exclude)
    hashes = ["--data", "model_verify_hashes=true", "--data", "ml_env_verify_hashes=true"] if options.hashes else []
    checks = ["--data", "ml_env_check_active=true", *hashes]
    run = run_deploy("--dry", *limit_args(hosts), *checks, *pyinfra_args, inventory=options.inventory)
    if not run.report:
        sys.stderr.write(run.output[-3000:])
        print("verify: the dry run did not complete (see its log above)", file=sys.stderr)
        return 1
    records = {name: run.report.get(name, {}) for name in hosts}
    outcomes = {name: HostOutcome.from_record(record) for name, record in records.items()}
    drift = {name: list(record.get("changes", [])) + (["failed"] if record.get("result") != "ok" else [])
             for name, record in records.items()}
    print(f"{'host':14} {'state':8} {'drift':28} {'ML env':44} stack")
    for name in hosts:
        state = "DRIFT" if drift[name] else "ok"
        outcome = outcomes[name]
        print(f"{name:14} {state:8} {', '.join(drift[name]) or '-':28} {outcome.env:44} {outcome.stack}")
        for line in outcome.details():
            print(f"{'':14} {'':8} {'':28} {'':44} {line}")
    drifted = [name for name in hosts if drift[name]]
    print(f"\nverify: {len(hosts) - len(drifted)}/{len(hosts)} host(s) match"
          + (f"; drift on {', '.join(drifted)}" if drifted else ""))
    return 1 if drifted or run.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
