"""The builder: a docker engine on the control side that builds what the hosts run (the ML env,
the stack's images), and the runtime base image both are built on.

The engine is the control node's own or any engine its docker SDK can reach (`ssh://` or a
socket). The docker SDK is imported only by a deploy that talks to the builder.
"""

from __future__ import annotations

import io
import json
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .caches import atomic_write

if TYPE_CHECKING:
    import docker

ENGINE_TIMEOUT = 6 * 3600  # seconds one engine call may stay silent: pip fetching a large wheel says nothing
PYTHON_PROBE = "import sys; print('python%d.%d' % sys.version_info[:2])"


class BuilderError(Exception):
    """The build engine cannot be used; the message says which one and what to do."""


@dataclass(frozen=True)
class BaseImage:
    ref: str
    id: str
    python: str  # "python3.11"
    platform: str  # "linux/amd64"


def describe(builder: str) -> str:
    return f"ml_env_builder {builder!r}" if builder else "the control node's docker engine (ml_env_builder '')"


def connect(builder: str) -> docker.DockerClient:
    """A client of BUILDER ('' = DOCKER_HOST or the local socket); ssh:// uses the system ssh and its config."""
    import docker  # 0.1-0.4 s: only when the builder is needed

    try:
        if not builder:
            client = docker.from_env(timeout=ENGINE_TIMEOUT)
        else:
            client = docker.DockerClient(base_url=builder, timeout=ENGINE_TIMEOUT, use_ssh_client=builder.startswith("ssh://"))
        client.ping()
    except docker.errors.DockerException as error:
        raise BuilderError(f"{describe(builder)}: cannot reach the docker engine ({error}); start it, "
                           "or set ml_env_builder to an engine that can build (e.g. 'ssh://root@gpu-01')") from None
    return client


@contextmanager
def builder_engine(builder: str, failing: str):
    """A client of BUILDER for the block, closed after it; a docker error inside becomes a BuilderError
    that names the builder and says FAILING (what was being done)."""
    client = connect(builder)
    import docker.errors  # loaded by connect

    try:
        yield client
    except docker.errors.DockerException as error:
        raise BuilderError(f"{describe(builder)}: {failing}: {error}") from None
    finally:
        client.close()


def _image_on_builder(client: docker.DockerClient, builder: str, ref: str):
    import docker.errors

    try:
        try:
            return client.images.get(ref)
        except docker.errors.ImageNotFound:
            return client.images.pull(ref)
    except docker.errors.DockerException as error:
        raise BuilderError(f"{describe(builder)}: base image {ref!r} is not there and cannot be pulled ({error}); "
                           "load it there (docker load) or set ml_env_base_image") from None


def _probe_record(cache_dir: Path, image_id: str) -> Path:
    return cache_dir / "base-images" / f"{image_id.removeprefix('sha256:')}.json"


def probe_base_image(client: docker.DockerClient, builder: str, ref: str, cache_dir: Path) -> BaseImage:
    """REF's id, platform and Python on the builder (pulled if absent). The Python is asked once per image id."""
    image = _image_on_builder(client, builder, ref)
    known = known_base_image(ref, image.id, cache_dir)
    if known is not None:
        return known
    output = client.containers.run(image.id, ["python3", "-c", PYTHON_PROBE], network_mode="none", remove=True)
    base = BaseImage(ref, image.id, output.decode().strip(), f"{image.attrs['Os']}/{image.attrs['Architecture']}")
    record = _probe_record(cache_dir, image.id)
    atomic_write(record, json.dumps({"ref": ref, "python": base.python, "platform": base.platform}))
    return base


def known_base_image(ref: str, image_id: str, cache_dir: Path) -> BaseImage | None:
    """The image IMAGE_ID as an earlier probe recorded it (an image id names its content), or None."""
    record = _probe_record(cache_dir, image_id)
    if not record.exists():
        return None
    facts = json.loads(record.read_text())
    return BaseImage(ref, image_id, facts["python"], facts["platform"]) if "platform" in facts else None


def require_base(client: docker.DockerClient, builder: str, base: BaseImage) -> None:
    """Build only on the very image the hosts run: the builder's REF must be BASE's id,
    not whatever the tag names now."""
    image = _image_on_builder(client, builder, base.ref)
    if image.id != base.id:
        raise BuilderError(f"{describe(builder)}: base image {base.ref!r} is {image.id[:19]} there but {base.id[:19]} "
                           "on the hosts: the build would be for another image; make them the same")


def tar_of(files: dict[str, bytes], mode: int = 0o600) -> bytes:
    """An uncompressed tar of FILES (name -> content), for a build context or `put_archive`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
