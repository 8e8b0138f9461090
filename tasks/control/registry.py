"""Registry images on the control side: what a reference names in its registry now (asked of the builder,
read-only), the logins `registry_credentials` give, and the pull once per fleet on the builder, kept as
`docker save | gzip` in the control cache (`image_cache_dir`) for `image_source = "ship"`.
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import secrets
from .builder import BaseImage, builder_engine, describe
from .compose_project import StackError
from .image_archives import save_archive


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
    import docker.errors  # loaded by builder_engine

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
