"""The compose project pushed to a host: staged in a 0700 directory, validated there, each file moved into
place (`files/host/install_project.sh`); and a project brought down by its name.
"""

from __future__ import annotations

import io
import shlex
import tarfile
import time

from pyinfra.api import operation

from .programs import program
from .stack_render import MANIFEST, Rendered
from .transfer import StreamedUpload

PRIVATE = (".env", ".env.digest")  # 0600: the values, and what could hint at them


def project_tar(rendered: Rendered) -> bytes:
    """The project's files, the override, .env and the two records: modes set here, owners root's."""
    buffer = io.BytesIO()
    entries = {**rendered.files, ".env": rendered.dotenv.encode(), ".env.digest": rendered.digest.encode(),
               MANIFEST: rendered.manifest.encode()}
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600 if name in PRIVATE else 0o644, int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@operation(is_idempotent=False)
def bring_down(project: str, compose_dir: str):
    """`docker compose down` of a project by its name (compose finds its containers by their labels): its
    containers and networks go, its volumes stay."""
    yield f"cd {shlex.quote(compose_dir)} && docker compose -p {shlex.quote(project)} down --remove-orphans"


@operation(is_idempotent=False)
def push_project(compose_dir: str, rendered: Rendered):
    """Stage the project in a 0700 directory, validate it there (`docker compose config -q`), then move each
    file into place and remove what the last push placed and this one does not."""
    staged = shlex.quote(f"{compose_dir}/.next")
    yield f"rm -rf {staged} && install -d -m 0700 {staged}"
    # streamed into a directory only root can read: the .env never passes through a readable copy
    yield StreamedUpload(project_tar(rendered), "compose project", f"{compose_dir}/.next/project.tar")
    yield program("install_project.sh", compose_dir)
