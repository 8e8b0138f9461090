"""The runtime base image (`ml_env_base_image`) on a host that needs the env: the image the env is built on,
checked in (and that host-mode downloads run in), pinned by id.

The id is the one the env is built on: the host's own when an earlier probe recorded it (the builder is not
asked then, tasks/control/env_build.py `base_image`), else the builder's. A host that lacks the image, or
holds another id under its tag, gets exactly that id before the env's import check runs there:

- pulled by the host (`image_source = "pull"`) by the registry digest the builder's copy was pulled by
  (`NAME@sha256:…`), with the registry's login streamed as for the stack's images (files/host/pull_images.sh);
- shipped from the builder (`image_source = "ship"`, and always for an image no registry holds: one built or
  loaded on the builder) as the stack's images are: one `docker save | gzip` per fleet, named by the id, only
  the layers a host lacks where its engine allows (tasks/host/stack_images.py `ship_image`).

Either way the host's tag is then checked to name that very id. A host needs none of this when no env is wanted.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pyinfra import host
from pyinfra.api import operation

from ..config import HostConfig
from ..control.builder import BaseImage, BuilderError
from ..control.caches import once
from ..control.image_archives import save_base_image
from ..control.registry import RegistryImage, base_on_builder, docker_config, registry_of, repository_of
from ..report import report
from .failure import HostProblem, step
from .ml_env import MlEnvState, env_wanted, host_problem
from .programs import program
from .stack_images import HeldLayersFact, archive_send_size, ship_image
from .transfer import StreamedUpload

if TYPE_CHECKING:
    from ..control.fleet_context import FleetContext


@dataclass(frozen=True)
class BasePlan:
    """What puts the pinned base image on one host."""

    action: str  # "none": the host holds that id; "pull": the host pulls PINNED; "ship": the builder's copy is sent
    pinned: str = ""  # for "pull": NAME@sha256:…, the registry digest the builder's copy was pulled by
    copy: RegistryImage | None = None  # the builder's copy, when the host needs it


def plan_base(host_image: str | None, base: BaseImage, image_source: str,
              builder_copy: Callable[[], RegistryImage]) -> BasePlan:
    """The host holds HOST_IMAGE under BASE's tag (None: nothing). Nothing to do when that is BASE's id; else it
    pulls it by digest where `image_source` is "pull" and a registry holds the builder's copy (BUILDER_COPY asks the
    builder, only then), and is sent the builder's copy otherwise."""
    if host_image == base.id:
        return BasePlan("none")
    copy = builder_copy()
    if image_source == "pull" and copy.digest:
        return BasePlan("pull", f"{repository_of(base.ref)}@{copy.digest}", copy)
    return BasePlan("ship", "", copy)


def label(base: BaseImage) -> str:
    return f"Base image {base.ref} ({base.id[:19]}…)"


def base_archive(config: HostConfig, base: BaseImage) -> Path:
    """Where the control cache keeps the base image's `docker save | gzip`: by its id."""
    return Path(config.image_cache_dir).expanduser() / f"base-{base.id.removeprefix('sha256:')[:16]}.tar.gz"


@operation(is_idempotent=False)
def pull_base_image(pinned: str, reference: str, compose_dir: str, credentials: dict[str, str]):
    """The host pulls PINNED (`NAME@sha256:…`) with its registry's login, if `registry_credentials` has one,
    streamed on stdin (files/host/pull_images.sh), and tags it REFERENCE."""
    yield StreamedUpload(docker_config(credentials, [registry_of(pinned)]), "registry credentials", compose_dir,
                         receiver=program("pull_images.sh", "--image", pinned, reference))


@operation(is_idempotent=False)
def check_base_image(reference: str, image_id: str):
    """The host's REFERENCE names IMAGE_ID now, the id the env is built on."""
    q = shlex.quote
    found = f"$(docker image inspect -f '{{{{.Id}}}}' -- {q(reference)})"
    message = q(f"base image {reference}: the host holds another id than the pinned {image_id}")
    yield f'test "{found}" = {q(image_id)} || {{ echo {message} >&2; exit 1; }}'


@step("Base image")
def converge(config: HostConfig, fleet: FleetContext, state: MlEnvState) -> BaseImage | None:
    """Put the runtime base image on this host when the env is wanted, pinned by id; returns it, the image the env
    is built on (None: no env is wanted, or the host failed)."""
    if not env_wanted(config):
        return None
    try:
        base = fleet.base_image(config, state.image_id)
        problem = host_problem(config, state, base)
        if problem:
            raise HostProblem(problem)
        plan = plan_base(state.image_id, base, config.image_source, lambda: once(
            ("base copy", config.ml_env_builder, base.id), lambda: base_on_builder(base, config.ml_env_builder)))
    except BuilderError as error:
        raise HostProblem(error) from None
    name = label(base)
    if plan.action == "none":
        host.log(f"{name}: on the host (no change)")
        return base
    report[host.name].changed("base image")
    held = f"; the host holds {state.image_id[:19]}… under that tag" if state.image_id else ""
    if plan.action == "pull":
        host.log(f"{name}: pull {plan.pinned} (the host pulls it{held})")
        pull_base_image(name=f"{name}: pull", pinned=plan.pinned, reference=base.ref,
                        compose_dir=config.compose_project_dir, credentials=config.registry_credentials)
    else:
        archive, copy = base_archive(config, base), plan.copy
        assert copy is not None  # a "ship" plan carries the builder's copy
        layers = host.get_fact(HeldLayersFact)
        why = "" if copy.digest or config.image_source == "ship" else ", no registry holds it"
        size = (archive_send_size(archive, layers)
                or f"{copy.size / 1e6:.0f} MB unpacked, to save once on the builder, then send")
        host.log(f"{name}: ship {size} (from the builder{why}{held})")
        ship_image(name=f"{name}: ship", reference=f"{base.ref} ({base.id[:19]}…)",
                   make_archive=partial(save_base_image, base, config.ml_env_builder, archive), archive=archive,
                   compose_dir=config.compose_project_dir,
                   held=tuple(sorted(layers.layers)) if layers.loads_partial else ())
    check_base_image(name=f"{name}: check its id", reference=base.ref, image_id=base.id)
    return base
