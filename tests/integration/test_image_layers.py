"""Images sent layer by layer between real engines of the fleet: an image with a layer that repeats (as the
empty layer does), saved by one host's docker and loaded, without the layers it holds, by another's."""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest

from rehearsal.baseimage import IMAGE_NAME
from tasks.control.image_archives import partial_archive
from tasks.host.stack_images import HeldLayersFact, layers_to_send

# Copying one file twice (one mtime: the classic builder keeps the context's) makes one layer twice.
DOCKERFILES = {"lower": f"FROM {IMAGE_NAME}\nCOPY a /a\n",
               "upper": "FROM layers-test:lower\nCOPY b /b\nCOPY a /a\n"}


def context(dockerfile: str) -> bytes:
    """A build context as a tar: DOCKERFILE and the files a and b."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        for name, content in (("Dockerfile", dockerfile.encode()), ("a", b"same\n"), ("b", b"other\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(content), 1_700_000_000
            archive.addfile(info, io.BytesIO(content))
    return data.getvalue()


def on(fleet, record, command: str, **run) -> subprocess.CompletedProcess:
    result = subprocess.run([*fleet.fleet.ssh_argv(record), command], capture_output=True, timeout=300, **run)
    assert result.returncode == 0, f"{record.name}: {command}: {result.stderr[-2000:]!r}"
    return result


@pytest.mark.heavy
def test_an_image_whose_layer_repeats_loads_where_its_lower_layers_are_held(fleet, tmp_path):
    builder, other = fleet.hosts
    try:
        for tag, dockerfile in DOCKERFILES.items():
            on(fleet, builder, f"DOCKER_BUILDKIT=0 docker build -q -t layers-test:{tag} -", input=context(dockerfile))
        layers = fleet.ssh(builder, "docker image inspect -f '{{range .RootFS.Layers}}{{.}} {{end}}' "
                                    "layers-test:upper").split()
        assert len(layers) == 4 and layers[1] == layers[3] != layers[2]  # base, a, b, a again
        lower = on(fleet, builder, "docker save layers-test:lower").stdout
        on(fleet, other, "docker load -q", input=lower)  # the other host holds the base and the first a
        archive = tmp_path / "upper.tar.gz"
        archive.write_bytes(on(fleet, builder, "docker save layers-test:upper | gzip -1").stdout)

        held = HeldLayersFact().process(fleet.ssh(other, HeldLayersFact().command()).splitlines())
        leave_out, total = layers_to_send(archive, held.layers)
        assert held.loads_partial and total == 4 and len(leave_out) == 1  # the base's file alone stays behind
        on(fleet, other, "docker load -q", input=partial_archive(archive, leave_out).read_bytes())
        ids = {fleet.ssh(record, "docker image inspect -f '{{.Id}}' layers-test:upper").strip()
               for record in fleet.hosts}
        assert len(ids) == 1
    finally:
        for record in fleet.hosts:
            fleet.ssh(record, "docker rmi -f layers-test:upper layers-test:lower", check=False)
