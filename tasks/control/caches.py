"""The control node's caches: files written whole or not at all, and values made once per deploy.

Every file a control cache holds (env artifacts and manifests, base image records, model trees,
image archives) is written through `atomic_file`: a temporary file of a unique name beside the
target, flushed to disk, then renamed over it. A crash, a full disk or a second deploy on the same
control node never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


@contextmanager
def atomic_file(target: Path, name: Callable[[], str] | None = None) -> Iterator[BinaryIO]:
    """A binary file object whose content becomes TARGET when the block ends without an error; with NAME,
    the file of TARGET's folder that NAME() returns then (for a name that follows from the content)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target.parent / name() if name else target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write(target: Path, data: bytes | str) -> None:
    """TARGET holds DATA, written whole or not at all."""
    with atomic_file(target) as out:
        out.write(data.encode() if isinstance(data, str) else data)


def file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


class Remembered:
    """Values the control node made before, remembered in PATH (JSON: key -> value, the newest LIMIT), so a run
    whose inputs did not change makes none of them again. Only what a VALID value matches is read back; the
    file holds no secret (the callers' keys and values are the deploy's own, or digests)."""

    LIMIT = 256

    def __init__(self, path: Path, valid: re.Pattern):
        self.path = path
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        self.known: dict[str, str] = {key: value for key, value in known.items()
                                      if isinstance(value, str) and valid.fullmatch(value)
                                      } if isinstance(known, dict) else {}

    def __call__(self, key: str, make: Callable[[], str]) -> str:
        if key not in self.known:
            self.known[key] = make()
            for old in list(self.known)[:-self.LIMIT]:
                del self.known[old]
            if self.path.parent.is_dir():
                atomic_write(self.path, json.dumps(self.known, indent=0))
        return self.known[key]


class Once:
    """Each key's value is made once per deploy, however many hosts (greenlets) ask; a failure too,
    so every host reports the same error instead of trying again."""

    def __init__(self):
        self.results: dict = {}
        self.locks: dict = {}

    def __call__(self, key, make: Callable):
        lock = self.locks.setdefault(key, threading.Lock())  # gevent-patched under pyinfra
        with lock:
            if key not in self.results:
                try:
                    self.results[key] = (make(), None)
                except Exception as error:  # noqa: BLE001 (re-raised below, to every caller)
                    self.results[key] = (None, error)
        value, failure = self.results[key]
        if failure is not None:
            raise failure
        return value


once = Once()
