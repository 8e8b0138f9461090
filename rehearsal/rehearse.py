"""`make rehearse`: converge the local rehearsal fleet twice (directories, ML env, models, the
reranker stack), prove the second run changed nothing, and ask every host's service for its health."""

from __future__ import annotations

import json
import subprocess
import sys

from rehearsal.fleet import Fleet
from tasks.fleet.runner import print_host_table, run_deploy

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
    return check_health(fleet)


def check_health(fleet: Fleet) -> int:
    """The reranker's /health and a real request on every host: the stack runs on the mounted env and model."""
    failed = 0
    print()
    for record in fleet.live_records():
        probe = ("curl -fsS http://127.0.0.1:8080/health && echo && "
                 "curl -fsS 'http://127.0.0.1:8080/tokenize?text=hello%20fleet'")
        result = subprocess.run([*fleet.ssh_argv(record), probe], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            failed += 1
            print(f"rehearse: {record.name}: the reranker does not answer: {result.stderr.strip()}", file=sys.stderr)
            continue
        health, work = (json.loads(line) for line in result.stdout.splitlines())
        print(f"rehearse: {record.name}: healthy: env {health['env_id']}, "
              f"model {health['model']}@{health['commit'][:12]}, "
              f"python {health['python']}; tokens {work['tokens']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
