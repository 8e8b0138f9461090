"""The compose project pushed to a host: staged in a 0700 directory of this run's own (`.next-<mark>`), validated
there, each file moved into place (`files/host/install_project.sh`); and a project brought down by its name. Each
step that changes the stack holds the compose directory's lock (`files/host/stack_locked.sh`).
"""

from __future__ import annotations

import io
import tarfile
import time

from pyinfra.api import operation

from .programs import program, program_text
from .stack_render import MANIFEST, SHIPPED_MODE, Rendered
from .transfer import RUN_MARK, StreamedUpload

PRIVATE = (".env", ".env.digest")  # 0600: the values, and what could hint at them
STAGE = f".next-{RUN_MARK}"  # this run's staging directory in the compose directory: never an earlier run's
# seconds a step waits for the compose directory's lock: a step of an earlier run that a lost connection left
# running (an install, `compose up`) holds it until it ends
LOCK_WAIT = 600


def stack_locked(compose_dir: str, name: str, *args: str | int) -> str:
    """The host program NAME with ARGS, run holding COMPOSE_DIR's lock (`files/host/stack_locked.sh`)."""
    return program("stack_locked.sh", compose_dir, LOCK_WAIT, name, program_text(name), *args)


def project_tar(rendered: Rendered) -> bytes:
    """The project's files with their modes (`Rendered.modes`), the override, .env and the two records (0600:
    PRIVATE, or 0644); owners root's."""
    buffer = io.BytesIO()
    entries = {**rendered.files, ".env": rendered.dotenv.encode(), ".env.digest": rendered.digest.encode(),
               MANIFEST: rendered.manifest.encode()}
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            mode = 0o600 if name in PRIVATE else rendered.modes.get(name, SHIPPED_MODE)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@operation(is_idempotent=False)
def bring_down(project: str, compose_dir: str):
    """`docker compose down` of a project by its name (compose finds its containers by their labels): its
    containers and networks go, its volumes stay."""
    yield stack_locked(compose_dir, "bring_down.sh", compose_dir, project)


@operation(is_idempotent=False)
def push_project(compose_dir: str, rendered: Rendered):
    """Stage the project in this run's own 0700 directory, validate it there (`docker compose config -q`), then
    move each file into place and remove what the last push placed and this one does not."""
    yield program("stage_project.sh", compose_dir, STAGE)
    # streamed into a directory only root can read: the .env never passes through a readable copy
    yield StreamedUpload(project_tar(rendered), "compose project", f"{compose_dir}/{STAGE}/project.tar")
    yield stack_locked(compose_dir, "install_project.sh", compose_dir, STAGE)
