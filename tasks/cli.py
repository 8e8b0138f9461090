"""`mlstack`: the deploy's one command, run from any directory against an inventory file anywhere.

    mlstack plan INVENTORY [pyinfra options]      what would change on each host, with diffs (a dry run)
    mlstack deploy INVENTORY [pyinfra options]    apply it to every targeted host at once
    mlstack rollout INVENTORY [pyinfra options]   apply it canary first, then in batches
    mlstack verify INVENTORY [--hashes] [...]     read-only: does each host match what a deploy would make it?
    mlstack status INVENTORY [--json] [...]       read-only: what each host runs (release, env, models, services)
    mlstack logs INVENTORY SERVICE [--tail N]     read-only: a service's logs on each host, prefixed by host
    mlstack rollback INVENTORY [--to RELEASE]     put back the previous (or that) release, as a rollout does
    mlstack prune INVENTORY [--keep N] [--dry]    keep N releases per host; remove what no kept release uses

pyinfra's own options pass through (`--limit HOST`, `--data key=value`, `-v`). pyinfra reads group data
from `group_data/` in the current directory and beside the inventory. Exit status: 0 when every targeted
host is ok, 1 when any host failed (or drifted, for verify; could not be read, for status and logs), 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "plan": "what would change on each host, with diffs (a dry run: nothing on the hosts changes)",
    "deploy": "apply the deploy to every targeted host at once",
    "rollout": "apply it canary host(s) first, then in batches (rollout_* settings)",
    "verify": "read-only check: does each host match what a deploy would make it",
    "status": "read-only: each host's release, env, models, services, GPUs, drift and deploy lock",
    "logs": "read-only: one service's logs on each host, every line prefixed by the host's name",
    "rollback": "put each host back to its previous release (or --to RELEASE), canary first, then in batches",
    "prune": "keep each host's last N releases (--keep, default 3); remove older ones and what only they use",
}


def run_once(command: str, inventory: str, pyinfra_args: list[str]) -> int:
    """`plan` and `deploy`: one pyinfra run over the targeted hosts, its log streamed, then a table per host."""
    from .fleet.rollout import HostOutcome, print_table  # each command imports only what it runs
    from .fleet.runner import run_deploy
    mode = ["--dry", "--diff"] if command == "plan" else ["-y"]  # -y: no second planning pass before applying
    run = run_deploy(*mode, *pyinfra_args, inventory=inventory, echo=True)
    if not run.report:
        print(f"mlstack {command}: pyinfra stopped before any host was planned (see its log above)", file=sys.stderr)
        return 1
    outcomes = {name: HostOutcome.from_record(record) for name, record in run.report.items()}
    print_table(list(outcomes), outcomes)
    failed = sorted(name for name, record in run.report.items() if record.get("result") != "ok")
    if failed:
        print(f"\nmlstack {command}: failed on {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or run.returncode else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="mlstack", description=__doc__.split("\n\n")[0],
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         epilog="\n".join(f"  {name:8} {text}" for name, text in COMMANDS.items()))
        parser.add_argument("command", choices=COMMANDS)
        parser.parse_args(argv[:1])  # prints the usage and exits 2 (0 for --help)
    command, rest = argv[0], argv[1:]
    if command == "rollout":
        from .fleet import rollout
        return rollout.main(rest, prog="mlstack rollout")
    if command == "rollback":
        from .fleet import rollout
        from .rollback import ROLLBACK_TO
        to = argparse.ArgumentParser(add_help=False)
        to.add_argument("--to", default="", help="a release id (mlstack status); default: each host's previous")
        chosen, rest = to.parse_known_args(rest)
        return rollout.main(rest, prog="mlstack rollback", function="mlstack.rollback.rollback",
                            env={ROLLBACK_TO: chosen.to})
    if command == "prune":
        from .fleet import prune
        return prune.main(rest, prog="mlstack prune")
    if command == "verify":
        from .fleet import verify
        return verify.main(rest, prog="mlstack verify")
    if command in ("status", "logs"):
        from .fleet import day_two  # light: `mlstack status` waits for its start-up
        return day_two.status_main(rest) if command == "status" else day_two.logs_main(rest)
    parser = argparse.ArgumentParser(prog=f"mlstack {command}", description=COMMANDS[command],
                                     epilog="Other options go to pyinfra as they are (--limit, --data k=v, -v).")
    parser.add_argument("inventory", help="a pyinfra inventory file, e.g. inventory.py")
    options, pyinfra_args = parser.parse_known_args(rest)
    return run_once(command, options.inventory, pyinfra_args)


if __name__ == "__main__":
    sys.exit(main())
