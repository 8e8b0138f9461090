"""The stack's images on a host: which image each service runs as the deploy provides it, where the control
cache keeps its archive, and its shipping: made once per fleet (built, or pulled on the builder), sent with only
the layers the host lacks where its engine skips those it holds, checked (`files/host/load_image.sh`: sha256,
then `docker load`). Registry images the host pulls itself get the logins streamed on stdin.
"""

from __future__ import annotations

import re
import shlex
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

from pyinfra.api import FactBase, FunctionCommand, StringCommand, operation
from pyinfra.api.command import PyinfraCommand

from ..config import HostConfig
from ..control.builder import BaseImage, BuilderError
from ..control.caches import file_sha256, once
from ..control.compose_project import (
    StackError,
)
from ..control.image_archives import archive_layers, chain_ids, needless_layers, partial_archive
from ..control.registry import (
    RegistryImage,
    docker_config,
)
from . import fanout
from .failure import failed
from .fanout import PeerRun, Swarm
from .probe import carried, received
from .programs import program
from .transfer import RUN_MARK, StreamedUpload

LAYER_ID = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class HeldLayers:
    layers: frozenset[str] = frozenset()  # the chain id of every layer of every image on the host
    loads_partial: bool = False  # the classic image store: `docker load` reads no layer it holds


class HeldLayersFact(FactBase):
    """The layers a host holds, for an image about to be sent to it (files/host/image_layers_probe.sh)."""

    def command(self) -> str:
        return carried(program("image_layers_probe.sh"))

    def process(self, output: list[str]) -> HeldLayers:
        layers, store = set(), ""
        try:
            lines = received(output)
        except ValueError:
            lines = []  # not what the probe sends: no layer is taken as held, every one is sent
        for line in lines:
            if line.startswith("layers "):
                diff_ids = line[7:].split()
                if all(LAYER_ID.fullmatch(diff_id) for diff_id in diff_ids):
                    layers.update(chain_ids(diff_ids))
            elif line.startswith("store "):
                store = line[6:]
        return HeldLayers(frozenset(layers), store.startswith("[") and "io.containerd.snapshotter" not in store)


@dataclass(frozen=True)
class ServiceImage:
    """The image a service runs, as the deploy provides it."""

    reference: str  # a built image's tag, or the registry reference
    source: str = "build"  # "build": built once, shipped; "ship": pulled once, shipped; "pull": the host pulls
    registry: RegistryImage | None = None  # "ship": its digest, and its id where the builder holds it

    @property
    def label(self) -> str:
        return f"{self.reference} ({self.registry.digest[7:19]})" if self.registry else self.reference


def archive_of(config: HostConfig, image: ServiceImage) -> Path:
    """Where the control cache keeps IMAGE's `docker save | gzip`: by tag when built, by digest when pulled."""
    name = image.reference.replace(":", "-") if image.registry is None else f"pulled-{image.registry.digest[7:23]}"
    return Path(config.image_cache_dir).expanduser() / f"{name}.tar.gz"


def _image_ready(state, host, reference: str, make_archive) -> bool:
    try:
        once(("image", reference), make_archive)
    except (BuilderError, StackError) as error:
        return failed(host, f"image {reference}: {error}")
    return True


def archive_send_size(archive: Path, held: HeldLayers) -> str | None:
    """What sending ARCHIVE takes to a host holding HELD, for the plan; None while the archive is not made."""
    if not archive.exists():
        return None
    leave_out, total = layers_to_send(archive, held.layers) if held.loads_partial else ((), 0)
    return (f"{total - len(leave_out)} of {total} layers to send, the host holds the rest" if leave_out
            else f"{archive.stat().st_size / 1e6:.1f} MB to send")


def layers_to_send(archive: Path, held: frozenset[str]) -> tuple[tuple[str, ...], int]:
    """Which layer files of ARCHIVE a host holding the layers HELD (chain ids) can do without, and how many it
    has; none for an archive that is not one image's `docker save` (it is sent whole, and loaded as it is)."""
    try:
        layers = once(("layers", archive), lambda: archive_layers(archive))
    except (StackError, OSError, tarfile.TarError):
        return (), 0
    return needless_layers(layers, held), len(layers)


def image_fan_out(config: HostConfig, reference: str, archive: Path, base: BaseImage) -> tuple[Swarm, PeerRun] | None:
    """This host's part in the fan-out of REFERENCE's archive, or None: the direct path. Every host sent the image
    joins; the run's swarm is the largest group sent the same archive (which one depends on the layers a host holds,
    known once the archive is made: `ImageUpload`). The peers run as root with every capability dropped, in
    folders of the compose directory, root's: the seed serves the archive it was sent (`.image-<mark>.seed`), a
    leecher's arrives in `.image-<mark>.swarm` and is checked and loaded as a sent one is (`load_image.sh
    --swarm`)."""
    planned = archive.stat().st_size if archive.exists() else None  # not built yet: the run judges its size
    swarm = fanout.joined(config, "Image", reference, archive.parent, base, planned)
    if swarm is None:
        return None
    seed, work = (f"{config.compose_project_dir}/.image-{RUN_MARK}.{end}" for end in ("seed", "swarm"))
    # a leecher's adopt names the archive, known once it is made: ImageUpload adds it
    return swarm, fanout.peer_run(config, base, work, seed, (0, 0),
                                  {"seed": f"rm -rf -- {shlex.quote(seed)} {shlex.quote(work)}"})


class ImageUpload(PyinfraCommand):
    """ARCHIVE sent to the host, checked and loaded (`load_image.sh`); with a fan-out (tasks/host/fanout.py), a
    leecher first fetches it from its peers, and the seed keeps what it was sent to serve it."""

    def __init__(self, archive: Path, label: str, reference: str, compose_dir: str, sha256: str,
                 fan: tuple[Swarm, PeerRun] | None):
        super().__init__()
        self.archive, self.label, self.reference, self.sha256 = archive, label, reference, sha256
        incoming = f"{compose_dir}/.image-{RUN_MARK}.tar.gz"  # this run's own: an orphaned load keeps to its own
        self.upload = StreamedUpload(archive, label, incoming,
                                     then=program("load_image.sh", incoming, sha256, reference))
        self.fan = fan
        if fan:
            swarm, run = fan
            arrived = f"{run.work}/objects/{archive.name}"
            self.fan = swarm, replace(run, adopt={**run.adopt, "leech": program(
                "load_image.sh", "--swarm", run.work, arrived, sha256, reference)})

    def __repr__(self):
        return f"ImageUpload({self.label})"

    def execute(self, state, host, connector_arguments) -> bool:
        swarm, run = self.fan or (None, None)
        if swarm is not None:
            swarm.arrive(state, host.name, self.archive.name)
        seeding = swarm is not None and swarm.role(state, host.name) == "seed"

        def direct(adopted: list[str]) -> bool:
            if adopted:  # loaded from the swarm
                return True
            if seeding and run:
                return self._seed(state, host, connector_arguments, run.store)
            return self.upload.execute(state, host, connector_arguments)

        return fanout.take_part(state, host, connector_arguments, self.fan, direct,
                                lambda: {self.archive.name: self.archive.stat().st_size})


    def _seed(self, state, host, connector_arguments, store: str) -> bool:
        """The seed's copy: sent into STORE (this run's own folder), checked and loaded, and kept there to serve."""
        made, _ = host.run_shell_command(StringCommand(f"rm -rf -- {shlex.quote(store)} && "
                                                       f"mkdir -m 0700 -- {shlex.quote(store)}"), **connector_arguments)
        if not made:
            return failed(host, f"{self.label}: the fan-out's seed folder {store} could not be made")
        kept = f"{store}/{self.archive.name}"
        return StreamedUpload(self.archive, self.label, kept, then=program(
            "load_image.sh", "--seed", kept, self.sha256, self.reference)).execute(state, host, connector_arguments)


@operation(is_idempotent=False)
def ship_image(reference: str, make_archive, archive: Path, compose_dir: str, held: tuple[str, ...] = (),
               fan: tuple[Swarm, PeerRun] | None = None):
    """Make the archive once for the fleet (MAKE_ARCHIVE: build or pull, then `docker save | gzip`), then
    `docker load` it on each host that lacks the image, after a sha256 check (through FAN's swarm where it has
    one). A host whose engine skips layers it holds gets only the layers it lacks (HELD: the chain ids of those
    it has, where it skips)."""
    yield FunctionCommand(_image_ready, (reference, make_archive), {})
    leave_out, total = layers_to_send(archive, frozenset(held)) if held else ((), 0)
    if leave_out:
        archive = once(("partial", archive, leave_out), lambda: partial_archive(archive, leave_out))
    label = f"image {reference}" + (f" ({total - len(leave_out)} of {total} layers)" if leave_out else "")
    sha256 = once(("sha256", archive), lambda: file_sha256(archive))
    yield ImageUpload(archive, label, reference, compose_dir, sha256, fan)


@operation(is_idempotent=False)
def pull_with_credentials(compose_dir: str, profiles: list[str], services: list[str], registries: list[str],
                          credentials: dict[str, str]):
    """`docker compose pull` of SERVICES on the host, with the logins of REGISTRIES streamed to it on stdin
    (`files/host/pull_images.sh`): before `up`, which would pull without them."""
    yield StreamedUpload(docker_config(credentials, registries), "registry credentials", compose_dir,
                         receiver=program("pull_images.sh", compose_dir, ",".join(profiles), *services))
