"""`make bench-env`: the seed's production env (files/requirements.ml.txt: torch's CUDA build with its
nvidia-* wheels, transformers, sentence-transformers, openai) on a 2-host rehearsal fleet, all in one run:

- the first install (bytes to each host, time);
- an upgrade that moves one small package (openai), next to the whole-env path of the versions before
  the env store (the artifact streamed by OpenSSH into `tar -xz` on the host);
- the disk a host's env dir takes with three versions kept (`keep_envs=2`), next to one version alone;
- the store's upload throughput during the first install, next to `ssh host 'cat > file'` of as many bytes
  to both hosts at once (both write as much to the same disk: on this one-disk machine its writeback
  is part of either figure).

Issue 15's targets: an upgrade sends at most 1.1x the changed packages' installed size; three kept
versions take at most 1.2x one version's disk; throughput at least 80 % of raw ssh. Each env is built
(and unpacked into the control store) by a dry run before the timed deploys, so their times are the
hosts' own. Uses its own fleet ("envb") and caches, removed at the end (about 45 GB of disk while it
runs). Prints tables; asserts only that each run did what it is timed as.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rehearsal.fleet import Fleet, HostRecord
from rehearsal.index import add_to_wheelhouse
from tasks.control.env_store import read_tree, tree_objects
from tasks.fleet.runner import DeployRun, run_deploy
from tasks.paths import FILES

ENV_DIR = "/srv/mlstack/ml-env"
PINNED = "openai==1.71.0"
VERSIONS = ("1.71.0", "1.72.0", "1.73.0")  # openai, the small package that moves
SENT = re.compile(r"\[(host\d+)\] ML env (env-[0-9a-f]{16}): ([\d.]+) / [\d.]+ MB sent \(100%\) in ([\d.]+) s")
OPENAI_FILES = re.compile(r"^(lib/python3\.\d+/site-packages/openai[/-]|bin/openai$)")
PLANNED = re.compile(r"\[host1\] ML env: (?:none|env-[0-9a-f]{16}) → (env-[0-9a-f]{16})")


def requirements(version: str, folder: Path) -> Path:
    text = (FILES / "requirements.ml.txt").read_text()
    assert PINNED in text, f"files/requirements.ml.txt no longer pins {PINNED}: update bench/env_store.py"
    path = folder / f"requirements-openai-{version}.txt"
    path.write_text(text.replace(PINNED, f"openai=={version}"))
    return path


def sent_bytes(fleet: Fleet, records: list[HostRecord]) -> list[int]:
    """What the control node has sent on each host's link so far (the control side of its veth)."""
    return [int(Path(f"/sys/class/net/{fleet.veth(number)}/statistics/tx_bytes").read_text())
            for number in range(1, len(records) + 1)]


def deploy(fleet: Fleet, records: list[HostRecord], *args: str) -> tuple[DeployRun, list[int]]:
    before = sent_bytes(fleet, records)
    run = run_deploy(*args, env={"MLSTACK_FLEET": fleet.name}, echo=True)
    assert run.returncode == 0, run.output[-3000:]
    return run, [after - start for start, after in zip(before, sent_bytes(fleet, records), strict=True)]


def on_host(fleet: Fleet, record: HostRecord, command: str) -> str:
    return subprocess.run([*fleet.ssh_argv(record), command], capture_output=True, text=True, check=True).stdout


def whole_env_path(fleet: Fleet, record: HostRecord, artifact: Path) -> float:
    """Seconds for the path before the store: the whole artifact streamed by OpenSSH into `tar -xz`."""
    on_host(fleet, record, "rm -rf /srv/bench-whole && mkdir /srv/bench-whole")
    started = time.monotonic()
    with artifact.open("rb") as data:
        subprocess.run([*fleet.ssh_argv(record), "tar -xzf - -C /srv/bench-whole"], stdin=data, check=True)
    took = time.monotonic() - started
    on_host(fleet, record, "rm -rf /srv/bench-whole")
    return took


def raw_ssh(fleet: Fleet, records: list[HostRecord], size: int, scratch: Path) -> float:
    """MB/s of `ssh host 'cat > file'` to every host at once, SIZE incompressible bytes each (median host)."""
    payload = scratch / "payload.bin"
    with payload.open("wb") as out:
        subprocess.run(["head", "-c", str(size), "/dev/urandom"], stdout=out, check=True)

    def send(record: HostRecord) -> float:
        started = time.monotonic()
        with payload.open("rb") as data:
            subprocess.run([*fleet.ssh_argv(record), "cat > /srv/bench-raw.bin"], stdin=data, check=True)
        return time.monotonic() - started

    with ThreadPoolExecutor(len(records)) as pool:
        seconds = sorted(pool.map(send, records))
    for record in records:
        on_host(fleet, record, "rm -f /srv/bench-raw.bin")
    payload.unlink()
    return size / 1e6 / seconds[len(seconds) // 2]


def main() -> None:
    fleet = Fleet("envb")
    with tempfile.TemporaryDirectory(prefix="mlstack-bench-env-") as folder:
        scratch = Path(folder)
        cache = scratch / "ml-env-cache"
        files = [requirements(version, scratch) for version in VERSIONS]
        for path in files:
            add_to_wheelhouse(path)
        try:
            records = fleet.up(2)
            common = ("--data", f"ml_env_cache_dir={cache}", "--data", "keep_envs=2", "--data",
                      f"hf_control_cache_dir={scratch / 'hf'}", "--data", f"image_cache_dir={scratch / 'img'}")
            envs, builds = [], []
            for path in files:  # built and unpacked into the control store, no host changed
                started = time.monotonic()
                dry, _ = deploy(fleet, records, "--dry", *common, "--data", f"ml_env_requirements={path}")
                builds.append(time.monotonic() - started)
                (env,) = set(PLANNED.findall(dry.output))
                envs.append(env)
            installs = [deploy(fleet, records, "-y", *common, "--data", f"ml_env_requirements={path}")
                        for path in files]
            whole = whole_env_path(fleet, records[0], cache / f"{envs[1]}.tar.gz")
            disk_all = int(on_host(fleet, records[0], f"du -sb {ENV_DIR}").split()[0])  # a hard link counted once
            disk_one = int(on_host(fleet, records[0], f"du -sb {ENV_DIR}/envs/{envs[0]}").split()[0])
            kept = on_host(fleet, records[0], f"ls {ENV_DIR}/envs").split()
            assert sorted(kept) == sorted(envs), kept
            first_mb = sum(tree_objects(read_tree(cache, envs[0])).values()) / 1e6
            raw = raw_ssh(fleet, records, int(first_mb * 1e6), scratch)
        finally:
            fleet.down()

        trees = [read_tree(cache, env) for env in envs]
        held = tree_objects(trees[0])
        changed = sum(size for name, size in tree_objects(trees[1]).items() if name not in held)
        package = sum(entry.size for path, entry in trees[1].items() if OPENAI_FILES.match(path))
        artifact = (cache / f"{envs[1]}.tar.gz").stat().st_size
    print(f"\nbuilds (dry runs: pip, repack, control store): {', '.join(f'{s:.0f} s' for s in builds)}")
    print(f"envs: {', '.join(f'{env} (openai {version})' for env, version in zip(envs, VERSIONS, strict=True))}\n")
    print("| step | env MB sent to host1 | all MB to host1 | all MB to host2 | deploy s | upload s (host1) "
          "| MB/s (host1) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rates = []
    for label, (run, sent) in zip(("first install", "upgrade: openai 1.71→1.72", "upgrade: openai 1.72→1.73"),
                                  installs, strict=True):
        uploads = {host: (float(mb), float(seconds)) for host, _, mb, seconds in SENT.findall(run.output)}
        mb, seconds = uploads.get("host1", (0.0, 0.0))
        rate = mb / seconds if seconds else float("nan")
        rates.append(rate)
        print(f"| {label} | {mb:.1f} | {sent[0] / 1e6:.1f} | {sent[1] / 1e6:.1f} | {run.seconds:.1f} | "
              f"{seconds:.1f} | {rate:.0f} |")
    print(f"| upgrade 1.71→1.72, whole-env path (before the store) | {artifact / 1e6:.1f} | | | | {whole:.1f} | "
          f"{artifact / 1e6 / whole:.0f} |")
    upgrade = installs[1][1][0]
    print(f"\nupgrade 1.71→1.72: openai's installed size {package / 1e6:.2f} MB (its files that changed: "
          f"{changed / 1e6:.2f} MB); all bytes to host1 during that deploy {upgrade / 1e6:.2f} MB = "
          f"{upgrade / package:.2f}x openai's size (target <= 1.1x); the whole-env path sends {artifact / 1e6:.0f} MB")
    print(f"disk, host1's env dir with 3 versions: {disk_all / 1e9:.2f} GB; one version alone {disk_one / 1e9:.2f} GB "
          f"= {disk_all / disk_one:.3f}x (target <= 1.2x)")
    print(f"throughput: first install {rates[0]:.0f} MB/s per host, raw ssh cat to both hosts at once {raw:.0f} MB/s "
          f"per host = {rates[0] / raw:.0%} (target >= 80%)")


if __name__ == "__main__":
    main()
