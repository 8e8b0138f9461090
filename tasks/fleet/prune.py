"""`mlstack prune`: each host keeps its current release and the KEEP-1 other most recently activated ones, and
loses the releases beyond them and what no kept release uses (tasks/prune.py, one pyinfra run over the targeted
hosts); then the control node's caches are trimmed to what the kept releases of every targeted host need
(tasks/control/trim.py), only when every targeted host was read.

    mlstack prune INVENTORY [--keep N] [--dry] [--limit HOST|GROUP ...] [--exclude ...] [pyinfra options]

`--dry` lists what would go on each host and in the caches, with sizes, and changes nothing. Exit status: 0 when
every targeted host was pruned (with --dry: read) and the caches trimmed or left with a reason that is no
failure; 1 when a host could not be read or a removal failed (on a host, or in the caches); 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..control.trim import Needs, Trim, apply_trims, plan_trims
from .day_two import failure_text, host_order, printable
from .runner import run_deploy

PRUNE_FUNCTION = "mlstack.prune.prune"  # tasks/prune.py, as pyinfra imports it
PRUNE_OPTIONS = "MLSTACK_PRUNE"  # the environment variable that hands tasks/prune.py its options (JSON)
DEFAULT_KEEP = 3


def human(count: int) -> str:
    """COUNT bytes as people read them (decimal units, as docker shows sizes)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def removals(prune: dict) -> list[dict]:
    """What a host's prune removes (or would), one entry each: kind, name, detail, bytes, exact, the step's name."""
    items = [{"kind": "release", "name": release["id"], "bytes": 0, "exact": True, "step": "releases",
              "detail": f"activated {release['activated'] or '?'}, env {release['env'] or 'none'}"}
             for release in prune["releases"]["removed"]]
    items += [{"kind": "env", "name": env["id"], "bytes": env["bytes"], "exact": True, "step": "envs", "detail": ""}
              for env in prune["envs"]]
    items += [{"kind": "model", "name": f"{snapshot['folder']}@{snapshot['commit'][:12]}", "bytes": snapshot["bytes"],
               "exact": True, "step": f"snapshot {snapshot['commit']}",
               "detail": f"{snapshot['blobs']} file(s)" + (f", refs {', '.join(snapshot['refs'])}"
                                                          if snapshot["refs"] else "")}
              for snapshot in prune["snapshots"]]
    items += [{"kind": "image", "name": image["id"][:19], "bytes": image["bytes"], "exact": image["exact"],
               "step": f"image {image['id']}", "detail": ", ".join(image["services"])} for image in prune["images"]]
    return items


def host_lines(name: str, record: dict, width: int) -> list[str]:
    """A host's row and the lines under it: the releases it keeps, what goes (or went), and why something stays."""
    prune = record.get("prune")
    ok = record.get("result") == "ok"
    if not prune:
        return [f"{name:{width}}  {'FAILED':7} not read: {printable(failure_text(record))}"]
    dry, done = prune["dry"], set(prune["done"])
    items = removals(prune)
    gone = items if dry else [item for item in items if item["step"] in done]
    freed = sum(item["bytes"] for item in gone)
    exact = all(item["exact"] for item in gone)
    kept = prune["releases"]["kept"]
    summary = (f"keeps {len(kept)} release(s), {'would remove' if dry else 'removed'} "
               f"{sum(item['kind'] == 'release' for item in gone)}; {'would free' if dry else 'freed'} "
               f"{'' if exact else 'up to '}{human(freed)}")
    lines = [f"{name:{width}}  {'ok' if ok else 'FAILED':7} {summary}"]
    names = [release["id"] + (" (current)" if release["id"] == prune["current"] else "") for release in kept]
    under = [f"keep     {', '.join(names) or 'nothing: no release is recorded'}"]
    for item in items:
        verb = "remove " if dry else "removed" if item["step"] in done else "KEPT   "
        size = "" if item["kind"] == "release" else f"  {'' if item['exact'] else 'up to '}{human(item['bytes'])}"
        under.append(f"{verb}  {item['kind']} {item['name']}" + (f" ({item['detail']})" if item["detail"] else "")
                     + size)
    under += [f"note     {printable(note)}" for note in prune["notes"]]
    if not ok and record.get("failure"):
        under.append(f"failed   {printable(failure_text(record))}")
    return lines + [f"{'':{width}}  {line}" for line in under]


def trim_lines(trims: list[Trim], dry: bool) -> list[str]:
    lines = [f"  {trim.cache:7} {trim.what}" + (f" ({trim.detail})" if trim.detail else "")
             + f"  {human(trim.bytes)}" for trim in trims]
    total = sum(trim.bytes for trim in trims)
    return lines + [f"  {'would free' if dry else 'freed'} {human(total)}" if trims else "  nothing to trim"]


def control_caches(report: dict, narrowed: bool, dry: bool) -> tuple[list[str], bool]:
    """The control caches' part of the output, and whether it went wrong; trimmed (unless DRY) only when every
    targeted host was read and the run was not narrowed by --limit or --exclude."""
    unread = host_order(name for name, record in report.items() if not record.get("prune"))
    if unread:
        return [f"control caches left as they are: {', '.join(unread)} not read (a host not read may still need an "
                "old env, model or image)"], False
    if narrowed:
        return ["control caches left as they are: --limit/--exclude narrowed the run, and the hosts left out may "
                "still need an old env, model or image (prune the whole inventory to trim them)"], False
    records = [record["prune"] for record in report.values()]
    caches: dict[str, set[Path]] = {}
    for record in records:
        for name, path in record["caches"].items():
            caches.setdefault(name, set()).add(Path(path))
    trims = plan_trims(caches, Needs.merged([record["needs"] for record in records]))
    lines = ["control caches (trimmed to what the kept releases of every targeted host need):", *trim_lines(trims, dry)]
    problems = [] if dry else apply_trims(trims)
    lines += [f"  not removed: {problem}" for problem in problems]
    return lines, bool(problems)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of releases, 1 or more, not {text!r}")
    return int(text)


def main(argv: list[str], prog: str = "mlstack prune") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="keep each host's current release and the N-1 most "
                                     "recently activated others; remove the releases beyond and what no kept release "
                                     "uses (envs, model snapshots, images), then trim the control node's caches",
                                     epilog="Other options go to pyinfra as they are (--data k=v, -v).")
    parser.add_argument("inventory", help="a pyinfra inventory file, e.g. inventory.py")
    parser.add_argument("--keep", type=positive, default=DEFAULT_KEEP,
                        help="releases each host keeps, the current one included (default 3)")
    parser.add_argument("--dry", action="store_true", help="list what would go, with sizes; change nothing")
    parser.add_argument("--limit", action="append", default=[], help="host names, globs or groups (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], help="host names, globs or groups (repeatable)")
    options, pyinfra_args = parser.parse_known_args(argv)
    targets = [*(arg for pattern in options.limit for arg in ("--limit", pattern)),
               *(arg for pattern in options.exclude for arg in ("--exclude", pattern))]
    run = run_deploy("--dry" if options.dry else "-y", *targets, *pyinfra_args, inventory=options.inventory,
                     env={PRUNE_OPTIONS: json.dumps({"keep": options.keep, "dry": options.dry})},
                     function=PRUNE_FUNCTION, echo=True)
    if not run.report:
        print(f"{prog}: pyinfra stopped before any host was read (see its log above)", file=sys.stderr)
        return 1
    order = host_order(run.report)
    width = max([len(name) for name in order] + [4])
    print(f"\n{prog}{' --dry' if options.dry else ''}: each host keeps its current release and the "
          f"{options.keep - 1} most recently activated other(s){'; nothing is changed' if options.dry else ''}\n")
    for name in order:
        print("\n".join(host_lines(name, run.report[name], width)))
    lines, cache_problem = control_caches(run.report, bool(options.limit or options.exclude), options.dry)
    print("\n" + "\n".join(lines))
    failed = [name for name in order if run.report[name].get("result") != "ok"]
    if failed:
        print(f"\n{prog}: failed on {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or cache_problem or run.returncode else 0
