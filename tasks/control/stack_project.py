"""The user's compose project on the control side, read by compose itself, and the images of its `build:`
services, built once per fleet on the builder and kept as `docker save | gzip` in the control cache
(`image_cache_dir`).

The project is a directory (`stack`: a name under files/stacks/ or an absolute path) holding compose files
under compose's own names, or the ones `compose_files` lists, and the build contexts they name. Its files
reach the hosts byte for byte; what the deploy adds lives in `compose.mlstack.yml` (tasks/host/stack.py).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pyinfra.api.exceptions import PyinfraError

from .. import secrets
from ..paths import STACKS
from .builder import BaseImage, builder_engine, describe, require_base, tar_of
from .caches import atomic_file

COMPOSE_NAMES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")  # compose's order
OVERRIDE_NAMES = ("compose.override.yaml", "compose.override.yml", "docker-compose.override.yml",
                  "docker-compose.override.yaml")  # compose's order, whichever the main file's name
OVERRIDE = "compose.mlstack.yml"  # the deploy's own compose file, merged last
BASE_IMAGE_VARIABLE = "MLSTACK_BASE_IMAGE"  # the runtime image the env is built for, for `build.args`
# `${NAME}`, `${NAME:-default}`, `${NAME?error}`, ..., or `$NAME`; `$$` is a literal dollar.
VARIABLE = re.compile(r"\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<modifier>:?[-?+])?"
                      r"|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)")
SHIPPABLE = re.compile(r"[^\s\\\x00-\x1f\x7f](?:[^\\\x00-\x1f\x7f]*[^\s\\\x00-\x1f\x7f])?")  # one path per line
SKIPPED = {".git", "__pycache__", ".mypy_cache", ".pytest_cache", ".venv", "node_modules"}
DOTENV = ".env"  # the project's own: the base of the host's .env, which the deploy writes (not sent as a file)
# The start of a `.env` entry as compose reads one: `KEY=value`, `export KEY=value` or `KEY: value`.
DOTENV_ENTRY = re.compile(r"[ \t]*(?:export[ \t]+)?(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)[ \t]*[=:][ \t]*(?P<value>.*)")


class StackError(PyinfraError):
    """The stack cannot be planned or built; the message names the stack, the setting and what to do."""


def project_directory(stack: str) -> Path:
    return Path(stack) if stack.startswith("/") else STACKS / stack


@dataclass(frozen=True)
class Build:
    """One `build:` service: what the builder needs, paths absolute on the control node."""

    service: str
    context: Path
    dockerfile: str
    args: dict = field(hash=False)
    target: str | None
    network: str | None  # compose's `build.network`; None: the builder's default


@dataclass(frozen=True)
class ComposeProject:
    directory: Path
    files: tuple[str, ...]  # the project's compose files, relative to its directory, in merge order
    name: str  # compose's project name
    services: dict = field(hash=False)  # service -> its merged definition, variables not interpolated
    secrets: dict = field(hash=False, default_factory=dict)  # compose's top-level `secrets:`
    dotenv: dict = field(hash=False, default_factory=dict)  # the project's `.env`: key -> its entry as written
    volumes: dict = field(hash=False, default_factory=dict)  # compose's top-level `volumes:`
    networks: dict = field(hash=False, default_factory=dict)  # compose's top-level `networks:`

    @classmethod
    @cache  # read once per deploy, however many hosts
    def load(cls, stack: str, compose_files: tuple[str, ...] = ()) -> ComposeProject:
        directory = project_directory(stack)
        files = compose_files or default_compose_files(directory)
        dotenv = dotenv_entries(directory / DOTENV)
        model = compose_config(directory, files)
        return cls(directory, files, model["name"], model.get("services") or {}, model.get("secrets") or {}, dotenv,
                   volumes=model.get("volumes") or {}, networks=model.get("networks") or {})

    def reads(self, service: str) -> dict[str, bool]:
        """Variable -> whether it has a default, for every variable SERVICE's definition interpolates, and
        the variable of each `environment:` secret it uses (compose copies its value into the container)."""
        found: dict[str, bool] = {}
        for text in strings(self.services[service]):
            for match in VARIABLE.finditer(text.replace("$$", "")):
                name = match["braced"] or match["plain"]
                has_default = (match["modifier"] or "").lstrip(":") in ("-", "+")
                found[name] = found.get(name, False) or has_default
        for used in self.services[service].get("secrets") or []:
            source = used["source"] if isinstance(used, dict) else used
            variable = (self.secrets.get(source) or {}).get("environment")
            if variable:
                found.setdefault(variable, False)
        return found

    def active(self, profiles: list[str]) -> list[str]:
        """The services that run with PROFILES: those without a profile, and those in one of them."""
        return [name for name, spec in self.services.items()
                if not spec.get("profiles") or set(spec["profiles"]) & set(profiles)]

    def builds(self, resolved: dict) -> list[Build]:
        """The `build:` services, their args as compose interpolated them (RESOLVED: `resolved_config`)."""
        builds = []
        for name, spec in resolved.get("services", {}).items():
            if "build" in spec:
                build = spec["build"]
                builds.append(Build(name, Path(build["context"]), build.get("dockerfile", "Dockerfile"),
                                    build.get("args") or {}, build.get("target"), build.get("network")))
        return builds

    def files_to_ship(self) -> dict[str, bytes]:
        """Every file of the project directory, by relative path: the hosts get the project as it is
        (symbolic links, tool caches such as .git or __pycache__, and the `.env` the deploy writes from the
        project's excepted). Read once per deploy."""
        return _project_files(self.directory)

    def file_hashes(self) -> dict[str, str]:
        """sha256 of each of `files_to_ship`, computed once per deploy."""
        return _project_hashes(self.directory)


def dotenv_entries(path: Path) -> dict[str, str]:
    """Key -> its entry as written (a quoted value may span lines), for each entry of the project's `.env`, in
    order; a later entry of a key replaces an earlier one, as in compose. Values are kept as written, never
    parsed: on the host, compose reads them exactly as it does here. Comments and blank lines are left out."""
    if not path.is_file() or path.is_symlink():
        return {}
    entries: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise StackError(f"{path}: expected UTF-8 text, as compose reads a .env file") from None
    number = 0
    while number < len(lines):
        line = lines[number]
        number += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry = DOTENV_ENTRY.fullmatch(line)
        if entry is None:  # the line itself is never shown: it may hold a secret
            raise StackError(f"{path}, line {number}: expected KEY=value, as compose reads a .env file")
        text, quote = [line], entry["value"][:1]
        while quote in ("'", '"') and not _closes(entry["value"][1:] if len(text) == 1 else text[-1], quote):
            if number == len(lines):
                raise StackError(f"{path}: the value of {entry['key']} opens a {quote} quote that never closes")
            text.append(lines[number])
            number += 1
        entries.pop(entry["key"], None)
        entries[entry["key"]] = "\n".join(text)
    return entries


def _closes(text: str, quote: str) -> bool:
    """Whether TEXT holds the closing QUOTE (in double quotes, `\\"` is an escaped quote, not the end)."""
    if quote == "'":
        return "'" in text
    return re.search(r'(?<!\\)(?:\\\\)*"', text) is not None


@cache
def _project_files(directory: Path) -> dict[str, bytes]:
    found = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if SKIPPED & set(relative.parts) or not path.is_file() or path.is_symlink() or relative.as_posix() == DOTENV:
            continue
        name = relative.as_posix()
        if not SHIPPABLE.fullmatch(name):
            raise StackError(f"stack {str(directory)!r}: the file name {name!r} cannot be shipped (control "
                             "characters, a backslash, or spaces at either end): rename it")
        found[name] = path.read_bytes()
    return found


@cache
def _project_hashes(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in _project_files(directory).items()}


def project_of(config) -> ComposeProject:
    """The compose project a HostConfig names."""
    return ComposeProject.load(config.stack, tuple(config.compose_files))


def default_compose_files(directory: Path) -> tuple[str, ...]:
    """What `docker compose` reads there without -f: the first of its names, then the first override file
    found (compose 2.26 takes `compose.override.yaml` even beside `docker-compose.yml`)."""
    for name in COMPOSE_NAMES:
        if (directory / name).is_file():
            overrides = [override for override in OVERRIDE_NAMES if (directory / override).is_file()]
            return (name, *overrides[:1])
    raise StackError(f"stack {str(directory)!r}: none of {', '.join(COMPOSE_NAMES)} is there: "
                     "point `stack` at a compose project directory, or list its files in compose_files")


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in strings(key) + strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in strings(item)]
    return []


def compose_config(directory: Path, files: tuple[str, ...], values: dict[str, str] | None = None) -> dict:
    """The merged project as `docker compose config` prints it; variables interpolated from VALUES only
    (none of this process's environment), or not at all when VALUES is None."""
    if shutil.which("docker") is None:
        raise StackError("the control node needs the docker CLI with its compose plugin to read the stack "
                         "(`docker compose version` must work)")
    argv = ["docker", "compose", "--project-directory", str(directory),
            *[arg for name in files for arg in ("-f", str(directory / name))], "config", "--format", "json"]
    if values is None:
        argv.append("--no-interpolate")
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(values or {})}
    result = subprocess.run(argv, capture_output=True, text=True, env=environment, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise StackError(f"stack {str(directory)!r}: docker compose cannot read {', '.join(files)}: "
                         f"{result.stderr.strip()[-1500:]}")
    return json.loads(result.stdout)


@cache
def resolved_config(project: ComposeProject, values: tuple[tuple[str, str], ...]) -> dict:
    return compose_config(project.directory, project.files, dict(values))


def registry_images(resolved: dict) -> dict[str, str]:
    """Service -> the registry image it runs (`image:` without `build:`), as compose interpolated it."""
    return {name: spec["image"] for name, spec in resolved.get("services", {}).items()
            if "image" in spec and "build" not in spec}


@dataclass(frozen=True)
class RegistryImage:
    """A registry image for `image_source = "ship"`, as the builder sees it at plan time (no pull)."""

    reference: str
    digest: str  # the registry's manifest digest for REFERENCE now
    id: str  # the image id the builder holds for that digest; "" when it must pull it first
    size: int  # bytes unpacked, when the builder holds it


def repository_of(reference: str) -> str:
    """REFERENCE without its tag (`registry.corp:5000/team/api:1` -> `registry.corp:5000/team/api`)."""
    head, slash, last = reference.rpartition("/")
    return f"{head}{slash}{last.partition(':')[0]}"


def registry_of(reference: str) -> str:
    """The registry an image reference names, as docker reads it: its first component when that has a dot,
    a port or is localhost, else Docker Hub."""
    first, slash, _ = reference.partition("/")
    return first if slash and ("." in first or ":" in first or first == "localhost") else "docker.io"


def login(credentials: dict[str, str], registry: str) -> dict[str, str] | None:
    """The user and password `registry_credentials` give REGISTRY, expanded from the control node's
    environment, or None. Only for the engine's API and the host's one pull: never shown."""
    if registry not in credentials:
        return None
    user, _, password = secrets.expand(credentials[registry]).partition(":")
    return {"username": user, "password": password}


def docker_config(credentials: dict[str, str], registries: list[str]) -> bytes:
    """A docker `config.json` with the logins of REGISTRIES, for DOCKER_CONFIG."""
    auths = {}
    for registry in registries:
        account = login(credentials, registry)
        if account:
            token = base64.b64encode(f"{account['username']}:{account['password']}".encode()).decode()
            auths[registry] = {"auth": token}
    return json.dumps({"auths": auths}).encode()


def inspect_on_builder(reference: str, builder: str, credentials: dict[str, str]) -> RegistryImage:
    """What REFERENCE names in its registry now, and whether the builder already holds it: read-only (the
    registry is asked for the digest; nothing is pulled), so a dry run changes nothing."""
    import docker.errors  # noqa: PLC0415 (loaded by builder_engine)

    with builder_engine(builder, f"asking the registry for {reference} failed") as client:
        digest = client.images.get_registry_data(reference,
                                                 auth_config=login(credentials, registry_of(reference))).id
        try:
            local = client.images.get(reference)
        except docker.errors.ImageNotFound:
            return RegistryImage(reference, digest, "", 0)
        if f"{repository_of(reference)}@{digest}" not in (local.attrs.get("RepoDigests") or []):
            return RegistryImage(reference, digest, "", 0)  # the builder's copy is older than the registry's
        return RegistryImage(reference, digest, local.id, int(local.attrs.get("Size") or 0))


def pull_and_save(image: RegistryImage, builder: str, credentials: dict[str, str], archive: Path) -> Path:
    """Pull the image once for the fleet on the builder (the hosts may have no way to the registry) and keep
    `docker save | gzip` of it in the control cache, named by its digest."""
    if archive.exists():
        return archive
    with builder_engine(builder, f"pulling {image.reference} failed") as client:
        print(f"image {image.reference}: pulling on {describe(builder)}", file=sys.stderr, flush=True)
        pulled = client.images.pull(image.reference, auth_config=login(credentials, registry_of(image.reference)))
        if f"{repository_of(image.reference)}@{image.digest}" not in (pulled.attrs.get("RepoDigests") or []):
            raise StackError(f"image {image.reference}: it changed in its registry during the deploy "
                             f"(planned {image.digest[:19]}): run the deploy again")
        save_archive(client, image.reference, archive)
    return archive


def base_on_builder(base: BaseImage, builder: str) -> RegistryImage:
    """The builder's copy of the runtime base image BASE (its very id): the registry digest it was pulled by
    (`RepoDigests` under BASE.ref's repository; "" for an image built or loaded there, which no registry holds)
    and its size. Read-only: nothing is pulled."""
    with builder_engine(builder, f"reading the base image {base.ref!r} ({base.id[:19]}) failed") as client:
        image = client.images.get(base.id)
        pulled_as = [entry.partition("@") for entry in image.attrs.get("RepoDigests") or []]
        digests = [digest for name, _, digest in pulled_as if name == repository_of(base.ref)]
        return RegistryImage(base.ref, digests[0] if digests else "", image.id, int(image.attrs.get("Size") or 0))


def save_base_image(base: BaseImage, builder: str, archive: Path) -> Path:
    """`docker save | gzip` of the runtime base image, the very id the env was built on (the builder's BASE.ref
    must still be BASE.id), kept in the control cache by that id; `docker load` on a host tags it BASE.ref."""
    if archive.exists():
        return archive
    with builder_engine(builder, f"saving the base image {base.ref!r} failed") as client:
        require_base(client, builder, base)
        save_archive(client, base.ref, archive)
    return archive


def save_archive(client, name: str, archive: Path) -> None:
    """`docker save NAME | gzip` into ARCHIVE, written atomically; NAME is the tag `docker load` restores."""
    with atomic_file(archive) as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out:
        for chunk in client.images.get(name).save(named=name):
            out.write(chunk)
    print(f"image {name}: {archive.stat().st_size / 1e6:.1f} MB archive", file=sys.stderr, flush=True)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain id of each layer of an image whose layers are DIFF_IDS in order: what names a layer in
    an engine's store together with every layer below it (the OCI image spec's ChainID)."""
    chains: list[str] = []
    for diff_id in diff_ids:
        chains.append(diff_id if not chains else
                      "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest())
    return chains


def archive_layers(archive: Path) -> list[tuple[str, str]]:
    """(member name, chain id) of each layer of the one image in ARCHIVE (`docker save | gzip`), read from
    its manifest.json and image config."""
    try:
        with tarfile.open(archive, "r:gz") as saved:  # a member read after the index was made: a second pass
            (manifest,) = json.load(saved.extractfile("manifest.json"))
            diff_ids = json.load(saved.extractfile(manifest["Config"]))["rootfs"]["diff_ids"]
    except (KeyError, ValueError, TypeError, AttributeError, tarfile.TarError) as error:
        raise StackError(f"{archive}: not the `docker save` of one image ({error!r}): remove it to save it again")
    return list(zip(manifest["Layers"], chain_ids(diff_ids), strict=True))


def partial_archive(archive: Path, leave_out: tuple[str, ...]) -> Path:
    """ARCHIVE without the layer files LEAVE_OUT names, kept beside it: `docker load` with the classic
    image store reads no layer it already holds (by chain id), so a host that holds those gets only
    the rest."""
    key = hashlib.sha256("\0".join(leave_out).encode()).hexdigest()[:16]
    partial = archive.with_name(f"{archive.name.removesuffix('.tar.gz')}-without-{key}.tar.gz")
    if partial.exists():
        return partial
    with tarfile.open(archive, "r:gz") as saved, atomic_file(partial) as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as compressed, \
            tarfile.open(fileobj=compressed, mode="w|") as out:
        for member in saved:
            if member.name not in leave_out:
                out.addfile(member, saved.extractfile(member) if member.isfile() else None)
    return partial


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
