"""`python -m rehearsal up N | down | status` — the Makefile's fleet-up / fleet-down / fleet-status."""

from __future__ import annotations

import argparse
import sys

from rehearsal.fleet import Fleet, FleetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rehearsal")
    parser.add_argument("--fleet", help="fleet name (default: $MLSTACK_FLEET or 'rehearsal')")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="bring the fleet to N hosts").add_argument("hosts", type=int)
    commands.add_parser("down", help="stop and remove every host of the fleet")
    commands.add_parser("status", help="list the live hosts")
    args = parser.parse_args(argv)
    try:
        fleet = Fleet(args.fleet)
        if args.command == "up":
            records = fleet.up(args.hosts)
        elif args.command == "down":
            leftovers = fleet.down()
            for leftover in leftovers:
                print(f"fleet {fleet.name}: left behind: {leftover}", file=sys.stderr)
            print(f"fleet {fleet.name}: down")
            return 1 if leftovers else 0
        else:
            records = fleet.live_records()
    except FleetError as error:
        print(f"fleet error: {error}", file=sys.stderr)
        return 2
    print(f"fleet {fleet.name}: {len(records)} host(s) up (inventory/rehearsal.py, key {fleet.key})")
    for record in records:
        print(f"  {record.name:8} {record.ip:15} pid {record.pid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
