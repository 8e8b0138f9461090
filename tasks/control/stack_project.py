"""The stack project on the control side: its definition (`files/stacks/<name>/stack.yml`) and its
slim server image, built once per fleet on the builder and kept as `docker save | gzip` in the
control cache (`image_cache_dir`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml
from pyinfra.api.exceptions import PyinfraError

from tasks.config import FILES
from tasks.control.builder import BaseImage, builder_engine, describe, require_base, tar_of
from tasks.control.caches import atomic_file

STACKS = FILES / "stacks"


class StackError(PyinfraError):
    """The stack cannot be planned or built; the message names the stack, the setting and what to do."""


@dataclass(frozen=True)
class StackDef:
    name: str
    project: str
    dockerfile: str
    context: str | None
    services: dict = field(hash=False)

    @property
    def repository(self) -> str:
        return f"mlstack-{self.name}"

    @classmethod
    @cache  # read once per deploy, however many hosts (render copies what it changes)
    def load(cls, name: str) -> StackDef:
        data = yaml.safe_load((STACKS / name / "stack.yml").read_text())
        return cls(name, data["project"], data["dockerfile"], data.get("context"), data["services"])

    @property
    def directory(self) -> Path:
        return STACKS / self.name

    def build_files(self) -> dict[str, bytes]:
        """The image's build context: the stack's files, plus the `context` directory's content at its root."""
        files = {path.name: path.read_bytes() for path in sorted(self.directory.iterdir())
                 if path.is_file() and path.name != "stack.yml"}
        if self.context:
            root = self.directory / self.context
            if not root.is_dir():
                raise StackError(f"stack {self.name!r} builds from {root}, which does not exist: see the comment "
                                 f"at the top of files/stacks/{self.name}/stack.yml")
            for path in sorted(root.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    files[str(path.relative_to(root))] = path.read_bytes()
        return files


def image_tag(stack: StackDef, base_id: str) -> str:
    """Named by content: the build context and the base image id. Same content, same tag, no rebuild."""
    digest = hashlib.sha256(base_id.encode())
    for name, data in stack.build_files().items():
        digest.update(f"\0{name}\0{len(data)}\0".encode() + data)
    return f"{stack.repository}:{digest.hexdigest()[:16]}"


def build_and_save(stack: StackDef, tag: str, base: BaseImage, builder: str, archive: Path) -> Path:
    """Build the slim image on the builder once and keep `docker save | gzip` of it in the control cache."""
    if archive.exists():
        return archive
    buffer = io.BytesIO(tar_of(stack.build_files(), mode=0o644))
    with builder_engine(builder, f"building {tag} failed") as client:
        require_base(client, builder, base)
        print(f"image {tag}: building on {describe(builder)}", file=sys.stderr, flush=True)
        client.images.build(fileobj=buffer, custom_context=True, dockerfile=stack.dockerfile, tag=tag,
                            buildargs={"BASE_IMAGE": base.ref}, network_mode="none", rm=True)
        with atomic_file(archive) as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out:
            for chunk in client.images.get(tag).save(named=True):
                out.write(chunk)
    print(f"image {tag}: {archive.stat().st_size / 1e6:.1f} MB archive", file=sys.stderr, flush=True)
    return archive
