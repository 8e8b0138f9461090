"""The control side of the fan-out swarm (issue 25): the torrent the hosts' peers share, and the result line
a peer (files/host/swarm_peer.py) ends with. No network here: making a torrent makes no libtorrent session.

The torrent is BitTorrent v2 only (BEP 52), a choice among v1, v2 and hybrid:
- v2 aligns every file to a piece by construction: a file priority 0 (an object a host already holds) skips
  exactly that object, and no piece straddles two objects (no partial piece kept in a part file);
- each file has a SHA-256 merkle tree down to 16 KiB blocks: a bad block is pinned on the peer that sent it
  (v1 can only fail a whole piece and guess the sender);
- hashing on the control node: one pass of SHA-256 over the objects, measured with libtorrent 2.1.1 on the
  build machine (one 1 GB file in the page cache, one core, machine idle): v2 950 MB/s, v1 (SHA-1) 1,140
  MB/s, hybrid (both) 545 MB/s; v1's gain is small, and hybrid's only use (peers that speak v1 alone) does
  not arise: every peer runs the same libtorrent. Many small objects cost more per byte: 5,000 objects of
  310 MB in 1.2 s (263 MB/s), so the production env (37,426 objects, 6.07 GB) takes some 13 s: the same
  objects make the same torrent, and a caller may keep it. Its size: ~141 bytes an object (5.3 MB there).
The piece size is libtorrent's default for the total size (32 KiB for 3 MB, 256 KiB for 300 MB, 1 MiB for
6 GB), or PIECE_SIZE when given (a power of two, at least 16 KiB). A torrent of one object is a
single-file torrent named by the object (BitTorrent has no directory of one file); the peer saves it in
<save path>/objects all the same.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, NamedTuple

NAME = "objects"  # the torrent's name: its files are <save path>/objects/<name>
RESULT = "swarm-result "
BLOCK = 16 * 1024  # v2's merkle leaf: the smallest piece


def make_torrent(folder: Path, objects: list[tuple[str, int]], piece_size: int | None = None) -> bytes:
    """The .torrent (bencoded) of FOLDER/<name> for each (name, size) of OBJECTS, its files named objects/<name>
    whatever the folder (an env store's objects/, an HF cache's blobs/, the image cache): v2, private, no
    tracker, no creation date, no creator, so the same objects make the same bytes (and info-hash).
    Its file tree is ordered by name (BEP 52), whatever the order of OBJECTS."""
    import libtorrent as lt  # 40 ms: only where a fan-out is used, never on a no-op

    _check(folder, objects, piece_size)
    entries = [lt.create_file_entry(f"{NAME}/{name}", size) for name, size in objects]
    creator = lt.create_torrent(entries, piece_size or 0, lt.create_torrent.v2_only)
    creator.set_priv(True)  # libtorrent: no DHT, peer exchange or local discovery for it
    creator.set_creator("")
    creator.set_creation_date(0)
    with tempfile.TemporaryDirectory(prefix="mlstack-torrent-") as root:  # libtorrent reads ROOT/objects/<name>
        os.symlink(folder.resolve(), os.path.join(root, NAME))
        lt.set_piece_hashes(creator, root)
    return lt.bencode(creator.generate())


def _check(folder: Path, objects: list[tuple[str, int]], piece_size: int | None) -> None:
    """Names that are one path component each, once; sizes that are the files' own; a usable piece size."""
    if not objects or sum(size for _, size in objects) == 0:
        raise ValueError(f"a torrent of {folder} needs at least one object with content: got {objects!r}")
    if piece_size is not None and (piece_size < BLOCK or piece_size & (piece_size - 1)):
        raise ValueError(f"piece_size {piece_size}: expected a power of two of at least {BLOCK}")
    names = set()
    for name, size in objects:
        if name in names or not name or name in (".", "..") or "/" in name or "\0" in name or name.startswith("."):
            raise ValueError(f"object name {name!r}: expected a file name, once, not starting with '.'")
        names.add(name)
        path = folder / name
        actual = os.stat(path).st_size
        if actual != size:
            raise ValueError(f"{path}: {actual} bytes, expected {size}")


class SwarmResult(NamedTuple):
    """A peer's `swarm-result` line, checked: complete is False with a reason when it is missing or malformed."""
    complete: bool
    downloaded: int = 0
    uploaded: int = 0
    rejected: int = 0
    peers: tuple[str, ...] = ()
    reason: str = ""


FIELDS = {"complete": bool, "downloaded": int, "uploaded": int, "rejected": int, "peers": list, "reason": str}


def parse_result(stdout_lines: Iterable[str]) -> SwarmResult:
    """The last `swarm-result {json}` line of a peer's output (a host's: untrusted, every value checked)."""
    lines = [line for line in stdout_lines if line.startswith(RESULT)]
    if not lines:
        return SwarmResult(False, reason="no swarm-result line in the peer's output")
    try:
        fields = json.loads(lines[-1][len(RESULT):])
    except ValueError as error:
        return SwarmResult(False, reason=f"swarm-result is not JSON: {error}")
    problem = _problem(fields)
    if problem:
        return SwarmResult(False, reason=f"swarm-result: {problem}")
    return SwarmResult(fields["complete"], fields["downloaded"], fields["uploaded"], fields["rejected"],
                       tuple(fields["peers"]), fields["reason"])


def _problem(fields: object) -> str:
    if not isinstance(fields, dict):
        return f"expected an object, got {type(fields).__name__}"
    for key, kind in FIELDS.items():
        value = fields.get(key)
        if kind is int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:  # bool is an int in Python
                return f"{key} is {value!r}, expected a count"
        elif not isinstance(value, kind):
            return f"{key} is {value!r}, expected {kind.__name__}"
    if not all(isinstance(peer, str) for peer in fields["peers"]):
        return f"peers is {fields['peers']!r}, expected a list of addresses"
    return ""
