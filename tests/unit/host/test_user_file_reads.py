"""Host programs read files a non-root user controls without following a link or blocking on a FIFO.

The race (the owner swaps an object for a FIFO or a link after `find` listed it as a file) is played
deterministically: a `find` first on PATH lists what the real one would, less its `-type f` test, so
the programs open a FIFO and a link in place of listed files, as they would after the swap."""

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

from tasks.host.programs import program

RACED_FIND = """#!/bin/sh
# find as the race leaves it: what it listed as files are a FIFO and a link when they are opened
drop=no
for arg do
    shift
    if [ "$drop" = yes ]; then drop=no; elif [ "$arg" = -type ]; then drop=yes; else set -- "$@" "$arg"; fi
done
exec /usr/bin/find "$@"
"""
WAIT = 20  # seconds: the old programs blocked on the FIFO until killed


def raced_path(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "find").write_text(RACED_FIND)
    (bin_dir / "find").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def plant(objects: Path, tmp_path: Path) -> tuple[str, str]:
    """A FIFO and a link (to a file whose hash is its name) among the objects; their names."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not the owner's to show\n")
    fifo, link = "0" * 64 + "-644", hashlib.sha256(target.read_bytes()).hexdigest() + "-644"
    os.mkfifo(objects / fifo)
    (objects / link).symlink_to(target)
    return fifo, link


def run(command: str, env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], input=stdin, capture_output=True, env=env, timeout=WAIT)


def test_the_env_probe_reports_a_swapped_object_as_damaged_without_waiting_on_it(tmp_path):
    env_dir = tmp_path / "env"
    (env_dir / "objects").mkdir(parents=True)
    good = b"an object\n"
    (env_dir / "objects" / (hashlib.sha256(good).hexdigest() + "-644")).write_bytes(good)
    fifo, link = plant(env_dir / "objects", tmp_path)

    result = run(program("ml_env_probe.sh", env_dir, "no-such-image", "0:0"), raced_path(tmp_path))
    assert result.returncode == 0, result.stderr
    damaged = sorted(line.split()[1] for line in result.stdout.decode().splitlines() if line.startswith("damaged "))
    assert damaged == sorted([fifo, link])


def test_the_env_store_refuses_a_staged_object_swapped_for_a_fifo_or_a_link(tmp_path):
    env_dir = tmp_path / "env"
    (env_dir / "incoming").mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not the owner's to show\n")
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as archive:  # what a swap leaves in the staging folder
        fifo = tarfile.TarInfo("0" * 64 + "-644")
        fifo.type = tarfile.FIFOTYPE
        archive.addfile(fifo)
        link = tarfile.TarInfo(hashlib.sha256(target.read_bytes()).hexdigest() + "-644")
        link.type, link.linkname = tarfile.SYMTYPE, str(target)
        archive.addfile(link)

    result = run(program("env_store.sh", "repair", env_dir, "0badc0de"), raced_path(tmp_path), stream.getvalue())
    assert result.returncode == 1
    assert "an object arrived damaged (" in result.stderr.decode()
    assert os.listdir(env_dir / "incoming") == [] and os.listdir(env_dir / "objects") == []
