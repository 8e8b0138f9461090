"""The images of the compose project's `build:` services, built once per fleet on the builder and kept as
`docker save | gzip` in the control cache (`image_cache_dir`). The project itself is
tasks/control/compose_project.py; registry images are tasks/control/registry.py; archives and their layers
tasks/control/image_archives.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from pathlib import Path

from .builder import BaseImage, builder_engine, describe, require_base, tar_of
from .compose_project import SKIPPED, Build, ComposeProject, StackError
from .image_archives import save_archive


def image_tag(project: ComposeProject, build: Build, base_id: str) -> str:
    """Named by content: the build context, dockerfile, args, target and the base image id (not the service)."""
    digest = hashlib.sha256(json.dumps([base_id, build.dockerfile, build.args, build.target], sort_keys=True).encode())
    for name, data in context_files(build).items():
        digest.update(f"\0{name}\0{len(data)}\0".encode() + data)
    return f"{project.name}:{digest.hexdigest()[:16]}"  # services built alike share one image


def ignore_rules(context: Path) -> list[tuple[bool, re.Pattern]]:
    """The context's `.dockerignore` as (re-include, pattern) rules, in order: `*` and `?` stay within one
    path segment, `**` spans segments, `!` re-includes, a leading `/` is the context's root."""
    rules = []
    ignore = context / ".dockerignore"
    for line in ignore.read_text().splitlines() if ignore.is_file() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex = "".join(".*" if token == "**" else "[^/]*" if token == "*" else "[^/]" if token == "?"
                        else re.escape(token) for token in re.split(r"(\*\*|\*|\?)", pattern) if token)
        rules.append((include, re.compile(regex.replace(".*/", "(.*/)?") + r"\Z")))
    return rules


def ignored(relative: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether `.dockerignore` leaves RELATIVE out of the context: the last rule matching it, or one of its
    directories, decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    excluded = False
    for include, pattern in rules:
        if any(pattern.match(prefix) for prefix in prefixes):
            excluded = not include
    return excluded


def context_files(build: Build) -> dict[str, bytes]:
    """The build context as docker would send it: `.dockerignore` applied (the Dockerfile and the ignore
    file always go)."""
    if not build.context.is_dir():
        raise StackError(f"service {build.service}: its build context {build.context} does not exist")
    rules, always = ignore_rules(build.context), {build.dockerfile, ".dockerignore"}
    files = {}
    for path in sorted(build.context.rglob("*")):
        relative = path.relative_to(build.context).as_posix()
        if path.is_file() and not SKIPPED & set(path.relative_to(build.context).parts) and (
                relative in always or not ignored(relative, rules)):
            files[relative] = path.read_bytes()
    return files


def build_and_save(build: Build, tag: str, base: BaseImage | None, builder: str, archive: Path) -> Path:
    """Build the service's image on the builder once and keep `docker save | gzip` of it in the control cache."""
    if archive.exists():
        return archive
    buffer = io.BytesIO(tar_of(context_files(build), mode=0o644))
    with builder_engine(builder, f"building {tag} failed") as client:
        if base is not None:  # None: the build reads no ${MLSTACK_BASE_IMAGE} (tasks/host/stack.py `stack_base`)
            require_base(client, builder, base)
        print(f"image {tag}: building service {build.service} on {describe(builder)}", file=sys.stderr, flush=True)
        client.images.build(fileobj=buffer, custom_context=True, dockerfile=build.dockerfile, tag=tag,
                            buildargs={key: str(value) for key, value in build.args.items() if value is not None},
                            target=build.target, network_mode=build.network, rm=True)
        save_archive(client, tag, archive)
    return archive
