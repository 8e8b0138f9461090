"""The images of the compose project's `build:` services, built once per fleet on the builder and kept as
`docker save | gzip` in the control cache (`image_cache_dir`). The project itself is
tasks/control/compose_project.py; registry images are tasks/control/registry.py; archives and their layers
tasks/control/image_archives.py.

A build is `docker compose build SERVICE` of the user's own compose files against the builder's engine
(DOCKER_HOST), BuildKit on: docker's own context sender and `.dockerignore` rules apply, symbolic links go as
links, and what BuildKit offers (`RUN --mount`, `build.secrets`, `ssh`, `dockerfile_inline`, ...) works as far as
the builder's engine has it; what it lacks fails the build with a message naming the service and the feature.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .builder import ENGINE_TIMEOUT, BaseImage, builder_engine, describe, require_base
from .caches import Remembered, once
from .compose_project import Build, ComposeProject, StackError
from .image_archives import save_archive
from .registry import docker_config

IGNORE_FILE = ".dockerignore"
# A parser directive (`# syntax=docker/dockerfile:1`): only at the very top of a Dockerfile, before any
# comment, blank line or instruction.
DIRECTIVE = re.compile(r"#[ \t]*(?P<key>[A-Za-z][A-Za-z0-9_]*)[ \t]*=[ \t]*(?P<value>\S.*?)[ \t]*")
UNKNOWN_FLAG = re.compile(r"dockerfile parse error (?:on )?line (?P<line>\d+): unknown flag: (?P<flag>[\w-]+)", re.I)
CAPABILITY = re.compile(r"unsupported frontend capability moby\.buildkit\.frontend\.(?P<name>[\w.-]+)")
CAPABILITIES = {"contexts": "build.additional_contexts (named build contexts)"}
# What of the control node's environment the compose CLI needs to reach the builder: ssh:// uses the system
# ssh (its config under HOME, its agent); '' means DOCKER_HOST or the local socket, as for the docker SDK.
PASSED_ENVIRONMENT = ("HOME", "USER", "SSH_AUTH_SOCK")
LOCAL_ENGINE = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")


def image_tag(project: ComposeProject, build: Build, base_id: str) -> str:
    """Named by content: the build context as docker's rules send it (its ignore file applied, links as
    links), the Dockerfile, the whole `build:` section but its context's path (args, target, secrets' and
    ssh's names: never a secret's value), additional local contexts, and the base image id (not the service)."""
    spec: dict[str, Any] = (json.loads(build.spec) if build.spec else
                            {"dockerfile": build.dockerfile, "args": build.args, "target": build.target,
                             "network": build.network})
    spec.pop("context", None)
    digest = hashlib.sha256(json.dumps([base_id, spec], sort_keys=True).encode())
    dockerfile = dockerfile_path(build)
    if dockerfile is not None:
        digest.update(b"\0dockerfile\0" + _read(dockerfile, build, "its Dockerfile"))
    ignore, patterns = ignore_file(build), []
    if ignore is not None:
        text = _read(ignore, build, "its ignore file")
        digest.update(f"\0ignore\0{ignore.name}\0".encode() + text)
        patterns = ignore_patterns(text.decode(errors="replace"))
    _digest_tree(digest, build, "context", build.context, patterns)
    for name, source in sorted((spec.get("additional_contexts") or {}).items()):
        if Path(source).is_absolute():  # a local directory; else an image (docker-image://) or a URL
            _digest_tree(digest, build, f"additional context {name}", Path(source), [])
    return f"{project.name}:{digest.hexdigest()[:16]}"  # services built alike share one image


TAG = re.compile(r"[a-z0-9][a-z0-9_.-]*:[0-9a-f]{16}")  # `image_tag`'s
# A change this recent may be followed by another within the same clock tick, which no stat would tell: such a
# context's tag is made from its content and not remembered (as git treats its racy index entries).
RACY_NS = 2 * 10**9


def remembered_tag(cache_dir: Path, project: ComposeProject, build: Build, base_id: str) -> str:
    """`image_tag`, remembered in <CACHE_DIR>/image-tags.json by `tag_key`: a deploy whose build inputs did not
    change reads no file of them again, nor imports the docker SDK for their ignore rules."""
    key, newest = tag_key(project, build, base_id)
    if time.time_ns() - newest < RACY_NS:
        return image_tag(project, build, base_id)
    memo = once(("image tags", cache_dir), lambda: Remembered(cache_dir / "image-tags.json", TAG))
    return memo(key, lambda: image_tag(project, build, base_id))


def tag_key(project: ComposeProject, build: Build, base_id: str) -> tuple[str, int]:
    """What `image_tag` reads, by lstat alone, as a digest (no build arg kept in clear): the project's name, the
    build section, the base image, and every path below each local context, the Dockerfile and the ignore files
    (inode, mode, size, and modification and change times in ns: a write changes a file's ctime, which its
    owner cannot set back), so any change to them makes a new key; with the newest of those times."""
    digest = hashlib.sha256(json.dumps([project.name, build.spec, build.dockerfile, build.args, build.target,
                                        build.network, base_id], sort_keys=True, default=str).encode())
    dockerfile = dockerfile_path(build)
    spec = json.loads(build.spec) if build.spec else {}
    roots = [build.context, *(Path(source) for source in (spec.get("additional_contexts") or {}).values()
                              if Path(source).is_absolute())]
    singles = [dockerfile, dockerfile.with_name(f"{dockerfile.name}{IGNORE_FILE}")] if dockerfile else []
    stats = [(str(path), path) for path in [*singles, *roots]]
    for root in roots:
        for folder, folders, files in os.walk(root):
            folders.sort()
            paths = [Path(folder, name) for name in sorted(folders + files)]
            stats += [(str(path.relative_to(root)), path) for path in paths]
    newest = 0
    for name, path in stats:
        try:
            found = path.lstat()
        except OSError as error:
            digest.update(f"\0{name}\0absent {error.errno}".encode())
            continue
        newest = max(newest, found.st_mtime_ns, found.st_ctime_ns)
        digest.update(f"\0{name}\0{found.st_dev} {found.st_ino} {found.st_mode:o} {found.st_size} "
                      f"{found.st_mtime_ns} {found.st_ctime_ns}".encode())
    return digest.hexdigest(), newest


def dockerfile_path(build: Build) -> Path | None:
    """The Dockerfile on the control node; None for `dockerfile_inline`."""
    if build.spec and "dockerfile_inline" in json.loads(build.spec):
        return None
    return build.context / build.dockerfile  # an absolute `dockerfile` stays itself


def dockerfile_text(build: Build) -> str:
    if build.spec and "dockerfile_inline" in (spec := json.loads(build.spec)):
        return spec["dockerfile_inline"]
    path = dockerfile_path(build)
    return path.read_text(errors="replace") if path is not None and path.is_file() else ""


def ignore_file(build: Build) -> Path | None:
    """The ignore file docker applies to the context: `<Dockerfile>.dockerignore` beside the Dockerfile when
    there is one (it replaces the other), else the context's `.dockerignore`, else none."""
    dockerfile = dockerfile_path(build)
    if dockerfile is not None:
        specific = dockerfile.with_name(f"{dockerfile.name}{IGNORE_FILE}")
        if specific.is_file():
            return specific
    common = build.context / IGNORE_FILE
    return common if common.is_file() else None


def ignore_patterns(text: str) -> list[str]:
    """An ignore file's patterns as docker reads them (moby's ignorefile.ReadAll): a line that starts with `#`
    is a comment, blanks around a pattern go, `!` re-includes, each path is cleaned (`./x` is `x`, `a/../b`
    is `b`) and a leading `/` means the context's root."""
    patterns = []
    for number, line in enumerate(text.splitlines()):
        if number == 0:
            line = line.removeprefix("\ufeff")
        if line.startswith("#"):
            continue
        pattern = line.strip()
        if not pattern:
            continue
        invert = pattern.startswith("!")
        if invert:
            pattern = pattern[1:].strip()
        if pattern:
            rooted = pattern.startswith("/")
            pattern = posixpath.normpath(pattern).lstrip("/")  # Go's filepath.Clean, then the root dropped
            pattern = pattern if pattern != "" else "/" if rooted else "."
        patterns.append(f"!{pattern}" if invert else pattern)
    return patterns


def context_paths(root: Path, patterns: list[str]) -> list[str]:
    """The paths under ROOT that PATTERNS keep (docker's matcher, from its SDK: the same rules as moby's
    patternmatcher), sorted; a linked directory is a path of its own, never entered."""
    from docker.utils.build import PatternMatcher  # the docker SDK: imported only for a build

    return sorted(PatternMatcher(list(patterns)).walk(str(root)))


def _read(path: Path, build: Build, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise StackError(f"service {build.service}: cannot read {what} {path}: {error.strerror}") from None


def _digest_tree(digest, build: Build, label: str, root: Path, patterns: list[str]) -> None:
    """Add each path PATTERNS keep under ROOT: a file by its content and executable bit, a link by the path it
    names (never followed), a directory by its name."""
    if not root.is_dir():
        raise StackError(f"service {build.service}: its build {label} {root} is not a directory on the control "
                         "node (a context must be one here: its content names the image)")
    digest.update(f"\0{label}\0".encode())
    for relative in context_paths(root, patterns):
        path = root / relative
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            entry = f"link\0{os.readlink(path)}"
        elif stat.S_ISREG(mode):
            with path.open("rb") as file:
                entry = f"file\0{mode & 0o111:o}\0{hashlib.file_digest(file, 'sha256').hexdigest()}"
        else:
            entry = "directory" if stat.S_ISDIR(mode) else "other"
        digest.update(f"\0{relative}\0{entry}".encode())


def frontend_image(build: Build) -> str | None:
    """The frontend image BuildKit fetches to read the Dockerfile: its `# syntax=` directive, or the
    BUILDKIT_SYNTAX build arg; None: the engine's built-in frontend."""
    if build.args.get("BUILDKIT_SYNTAX"):
        return str(build.args["BUILDKIT_SYNTAX"])
    for line in dockerfile_text(build).splitlines():
        directive = DIRECTIVE.fullmatch(line.removeprefix("\ufeff"))
        if directive is None:
            return None
        if directive["key"].lower() == "syntax":
            return directive["value"]
    return None


def build_failure(build: Build, builder: str, output: str) -> str:
    """What a failed `docker compose build` means, naming the service and, where the builder's engine lacks
    one, the feature."""
    where = f"service {build.service}"
    flag = UNKNOWN_FLAG.search(output)
    if flag:
        lines = dockerfile_text(build).splitlines()
        number = int(flag["line"])
        words = lines[number - 1].split() if 0 < number <= len(lines) else []
        instruction = words[0].upper() if words else "an instruction"
        return (f"{where}: its Dockerfile uses `{instruction} --{flag['flag']}` (line {number}), which the Dockerfile "
                f"frontend of {describe(builder)} does not support: build on a newer docker engine (BuildKit "
                "0.10 / docker 23 or later for COPY --link), or name a frontend that has it with `# syntax=` "
                "(an image the builder fetches from its registry)")
    capability = CAPABILITY.search(output)
    if capability:
        feature = CAPABILITIES.get(capability["name"], f"the frontend capability {capability['name']}")
        return (f"{where}: its build uses {feature}, which the BuildKit of {describe(builder)} does not support: "
                "build on a newer docker engine (docker 23 or later)")
    frontend = frontend_image(build)
    if frontend and ("frontend gateway" in output or frontend in output):
        return (f"{where}: its Dockerfile names the frontend image {frontend} (`# syntax=`), which BuildKit on "
                f"{describe(builder)} must fetch from its registry, and that failed: {_last_error(output)}; put "
                "the image in a registry the builder reaches and name it there, or remove the directive to use "
                "the engine's built-in frontend")
    if "network bridge not found" in output:
        return (f"{where}: a RUN step needs the default bridge network, which the engine of {describe(builder)} "
                "does not have: set `build.network: none` (or `host`) for the service")
    return f"{where}: the build failed on {describe(builder)}: {_last_error(output)}"


def _last_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("failed to solve", "ERROR", "error"))]
    return (failed[-1] if failed else "\n".join(lines[-15:]))[-2000:]


def compose_build(project: ComposeProject, build: Build, values: dict[str, str], tag: str, builder: str,
                  credentials: dict[str, str]) -> None:
    """`docker compose build SERVICE` of the project's own files on BUILDER, BuildKit on, the image tagged TAG.
    Compose interpolates from VALUES only (the plan's values: build.secrets from `environment:` read them); none
    of them reaches argv or the log. DOCKER_CONFIG is a directory of the build's own: the logins of
    `registry_credentials` for FROM images, and no buildx builder of the control node's."""
    with tempfile.TemporaryDirectory(prefix="mlstack-build-") as scratch:  # mode 0700
        work = Path(scratch)
        descriptor = os.open(work / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as config:
            config.write(docker_config(credentials, list(credentials)))
        override = work / "compose.mlstack-build.json"  # the content tag instead of the project's image name
        override.write_text(json.dumps({"services": {build.service: {"image": tag}}}))
        argv = ["docker", "compose", "--project-directory", str(project.directory), "--project-name", project.name,
                *[arg for name in project.files for arg in ("-f", str(project.directory / name))],
                "-f", str(override), "--progress", "plain", "build", build.service]
        passed = PASSED_ENVIRONMENT + (() if builder else LOCAL_ENGINE)
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **values,
                       **{name: os.environ[name] for name in passed if name in os.environ},
                       "DOCKER_CONFIG": scratch, "DOCKER_BUILDKIT": "1",
                       **({"DOCKER_HOST": builder} if builder else {})}
        try:
            result = subprocess.run(argv, capture_output=True, text=True, env=environment, stdin=subprocess.DEVNULL,
                                    timeout=ENGINE_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise StackError(f"service {build.service}: the build ran past {ENGINE_TIMEOUT} s on "
                             f"{describe(builder)}") from None
    if result.returncode != 0:
        raise StackError(build_failure(build, builder, result.stdout + result.stderr))


def build_and_save(project: ComposeProject, build: Build, values: tuple[tuple[str, str], ...], tag: str,
                   base: BaseImage | None, builder: str, credentials: dict[str, str], archive: Path) -> Path:
    """Build the service's image on the builder once and keep `docker save | gzip` of it in the control cache."""
    if archive.exists():
        return archive
    with builder_engine(builder, f"building {tag} failed") as client:
        if base is not None:  # None: the build reads no ${MLSTACK_BASE_IMAGE} (tasks/host/stack.py `stack_base`)
            require_base(client, builder, base)
        print(f"image {tag}: building service {build.service} on {describe(builder)}", file=sys.stderr, flush=True)
        compose_build(project, build, dict(values), tag, builder, credentials)
        save_archive(client, tag, archive)
    return archive
