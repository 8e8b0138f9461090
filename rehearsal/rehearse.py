"""`make rehearse`: converge the local rehearsal fleet twice and prove the second run changed nothing."""

from __future__ import annotations

import sys

from rehearsal.fleet import Fleet
from tasks.runner import print_host_table, run_deploy

DEFAULT_HOSTS = 2


def main() -> int:
    fleet = Fleet()
    if not fleet.live_records():
        print(f"rehearse: bringing up a {DEFAULT_HOSTS}-host fleet {fleet.name!r}", flush=True)
        fleet.up(DEFAULT_HOSTS)
    first = run_deploy("-y", echo=True)
    print_host_table(first, "first run")
    if first.returncode != 0:
        print("rehearse: the first run failed (see the log above)", file=sys.stderr)
        return 1
    second = run_deploy("-y", echo=False)
    print_host_table(second, "second run")
    changed = second.changed_operations()
    if second.returncode != 0 or changed:
        for name, hosts in changed:
            print(f"rehearse: NOT idempotent: {name!r} changed again on {', '.join(hosts)}", file=sys.stderr)
        if second.returncode:
            print(second.output[-3000:], file=sys.stderr)
        return 1
    hosts = len(second.per_host())
    print(f"\nrehearse: second run changed nothing on {hosts} host(s): No change everywhere.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
