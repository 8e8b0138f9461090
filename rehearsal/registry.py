"""The fleet's image registry: Debian's docker-registry (distribution 2.8) on the control node's bridge
address, plain HTTP (each host's dockerd lists it with --insecure-registry), storage in the fleet's state
directory, brought up and torn down with the fleet. Its access log records who pulled what. It wants a
login, as a company registry does: user `rehearsal`, a password made for each fleet (`password`).

It holds one image of the rehearsal's own, `rehearsal/tools:1` (the base image plus a file, so its id
is one no host has), pushed once from the first host's engine, which then forgets it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import bcrypt

from rehearsal.listening import wait_until_listening
from rehearsal.prereqs import REGISTRY

PORT = 5000
TOOLS = "rehearsal/tools:1"
USER = "rehearsal"


def address_of(gateway: str) -> str:
    return f"{gateway}:{PORT}"


def tools_reference(gateway: str) -> str:
    """The registry image services of rehearsal projects can name."""
    return f"{address_of(gateway)}/{TOOLS}"


def log_path(state_dir: Path) -> Path:
    return state_dir / "registry.log"


def password(state_dir: Path) -> str:
    """The fleet registry's password (made on first use, kept 0600 in the fleet's state directory)."""
    path = state_dir / "registry-password"
    if not path.exists():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(secrets.token_hex(16))
    return path.read_text()


def start(gateway: str, state_dir: Path) -> subprocess.Popen:
    """Serve on GATEWAY:5000; return once it answers."""
    storage = state_dir / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    htpasswd = state_dir / "registry-htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt.hashpw(password(state_dir).encode(), bcrypt.gensalt()).decode()}\n")
    config = state_dir / "registry.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}},
        "http": {"addr": address_of(gateway)},
        "auth": {"htpasswd": {"realm": "mlstack-rehearsal", "path": str(htpasswd)}},
    }))
    log = log_path(state_dir)
    process = subprocess.Popen([str(REGISTRY), "serve", str(config)], stdin=subprocess.DEVNULL,
                               stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_until_listening(process, gateway, PORT, 30, "the fleet registry", log)
    return process


def has_tools(gateway: str, state_dir: Path) -> bool:
    name, _, tag = TOOLS.partition(":")
    login = base64.b64encode(f"{USER}:{password(state_dir)}".encode()).decode()
    request = urllib.request.Request(f"http://{address_of(gateway)}/v2/{name}/tags/list",
                                     headers={"Authorization": f"Basic {login}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return tag in (json.load(response).get("tags") or [])
    except OSError:
        return False


def seed(gateway: str, state_dir: Path, engine_socket: Path, base_image: str) -> None:
    """Build `rehearsal/tools:1` on the engine at ENGINE_SOCKET, push it, and remove it there again."""
    import docker  # the venv's SDK; prereqs run without it

    dockerfile = f"FROM {base_image}\nCOPY tools.txt /opt/tools.txt\n".encode()
    note = b"rehearsal/tools: an image of the fleet's registry\n"
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as archive:
        for name, data in (("Dockerfile", dockerfile), ("tools.txt", note)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    context.seek(0)
    reference = tools_reference(gateway)
    client = docker.DockerClient(base_url=f"unix://{engine_socket}", timeout=300)
    try:
        image, _ = client.images.build(fileobj=context, custom_context=True, tag=reference, network_mode="none",
                                       rm=True)
        login = {"username": USER, "password": password(state_dir)}
        for line in client.images.push(reference, stream=True, decode=True, auth_config=login):
            if "error" in line:
                raise RuntimeError(f"pushing {reference}: {line['error']}")
        client.images.remove(image.id, force=True)
    finally:
        client.close()
