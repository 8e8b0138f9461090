"""Owners below the top of a managed directory (issue 26 part 2), on a real 2-host fleet: the model cache's
configured owner becomes root while what is in it still belongs to uid 1000 (an owner changed from 1000 to 0),
and that user swaps a folder of the cache with a link to a root 0700 directory (renameat2 RENAME_EXCHANGE) in
a loop while the deploy runs. Judged by host state and the report."""

from __future__ import annotations

import shlex

import pytest
from fleet_helpers import CACHE

from rehearsal import hub

pytestmark = pytest.mark.heavy

ROOT_CACHE = ("--data", "model_cache_dir_uid=0", "--data", "model_cache_dir_gid=0",
              "--data", "model_cache_dir_mode=0755")
REPO = f"{CACHE}/hub/models--sentence-transformers--all-MiniLM-L6-v2"
COMMIT = hub.ensure_repos()[hub.MINILM]["main"]
DECOY = "/srv/decoy"  # root's, outside the cache
# Exchanges blobs/ and a link to the decoy, over and over, as the cache's owner can.
SWAP = ("import ctypes, sys\nrenameat2 = ctypes.CDLL(None, use_errno=True).renameat2\n"
        "while True:\n    renameat2(-100, sys.argv[1].encode(), -100, sys.argv[2].encode(), 2)\n")


def swapping(fleet, record) -> int:
    """The pid of a uid 1000 loop on RECORD exchanging REPO/blobs with REPO/blobs.swap -> DECOY."""
    fleet.ssh(record, f"ln -s {DECOY} {REPO}/blobs.swap && chown -h 1000:1000 {REPO}/blobs.swap")
    return int(fleet.ssh(record, "setpriv --reuid=1000 --regid=1000 --clear-groups python3 -c "
                                 f"{shlex.quote(SWAP)} {REPO}/blobs {REPO}/blobs.swap </dev/null >/dev/null 2>&1 "
                                 "& echo $!"))


def stop_swapping(fleet, record, pid: int) -> None:
    """The loop ended, blobs/ back in place (where a deploy removed the link and made blobs/ anew, as one
    that works there as root did, the fuller of the two)."""
    fleet.ssh(record, f"kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.1; done; cd {REPO} && "
                      "for name in blobs blobs.swap; do if [ -L $name ]; then rm $name; fi; done; "
                      "if [ -d blobs.swap ]; then if [ -n \"$(ls -A blobs 2>/dev/null)\" ]; then rm -r blobs.swap; "
                      "else rm -rf blobs && mv -T blobs.swap blobs; fi; fi")


def test_root_never_works_through_a_cache_another_user_owns_and_the_host_says_what_to_run(fleet):
    first = fleet.deploy()  # the rehearsal's cache: uid 1000's
    assert first.returncode == 0, first.output[-3000:]
    target, other = fleet.hosts
    # The other host is made root's as the message says: it converges as root.
    fleet.ssh(other, f"chown -R 0:0 {CACHE}")
    # The snapshot gone, so that a deploy has work to do in this repo's folders (before: as root).
    fleet.ssh(target, f"rm -r {REPO}/snapshots/{COMMIT} && mkdir -m 0700 {DECOY}")
    # Owners and modes (the loop's renames move the repo folder's times), the swapped names left out.
    stamp = (f"find {CACHE} -path '{REPO}/blobs*' -prune -o -printf '%p %u:%g %m\\n' | sort | md5sum; "
             f"stat -c '%u:%g %a' {DECOY}")
    pid = swapping(fleet, target)
    try:
        before = fleet.ssh(target, stamp)
        run = fleet.deploy(*ROOT_CACHE)
        after = fleet.ssh(target, stamp)
    finally:
        stop_swapping(fleet, target, pid)
    try:
        assert fleet.ssh(target, f"stat -c '%u:%g %a' {DECOY}").strip() == "0:0 700"
        assert after == before  # nothing in the cache changed (the swapped folder aside), the decoy neither
        failure = run.report[target.name]["failure"]
        assert failure["step"] == "Directory owners", run.output[-3000:]
        assert f"(in model_cache_dir {CACHE}) belongs to uid 1000, but the deploy works there as root" \
               in failure["message"]
        assert f"run `chown -R 0:0 {CACHE}`, or set model_cache_dir_uid = 1000" in failure["message"]
        assert run.report[other.name]["result"] == "ok"
        # What the message says to run, and the host converges as root: the snapshot made again.
        fleet.ssh(target, f"chown -R 0:0 {CACHE}")
        fixed = fleet.deploy(*ROOT_CACHE)
        assert fixed.returncode == 0, fixed.output[-3000:]
        assert fleet.ssh(target, f"find {CACHE} ! -uid 0 | head -3") == ""
        assert fleet.ssh(target, f"test -d {REPO}/snapshots/{COMMIT} && echo yes").strip() == "yes"
    finally:  # the rehearsal's owner again, for the tests after this one
        for record in fleet.hosts:
            fleet.ssh(record, f"rm -rf {DECOY} && chown -R 1000:1000 {CACHE}")
