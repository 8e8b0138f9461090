"""`build:` services built as compose builds them, on a real 2-host fleet: `docker compose build` on the
builder (host1's engine), BuildKit on. The image each host runs holds exactly what docker's own context and
ignore rules keep (`./x` cleaned, character classes, `<Dockerfile>.dockerignore`), a link in the context that
points out of it is sent as a link and never followed, `RUN --mount` caches and `build.secrets` work (the
secret in no argv, log or layer), and what the builder's engine lacks (`COPY --link` on docker 20.10, a
`# syntax=` frontend it cannot fetch) fails the host naming the service and the feature."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import secrets
import shlex
from pathlib import Path

import pytest
from fleet_helpers import ArgvWatch

from rehearsal import registry
from tasks.control.stack_project import context_paths, ignore_patterns

SETTINGS = {"ml_services": {}, "service_gpus": {}, "models": [], "service_models": {}, "http_checks": []}
COMPOSE = """\
name: kit
services:
  kit:
    build: &build
      context: ./app
      network: none
      args: {BASE_IMAGE: "${MLSTACK_BASE_IMAGE}"}
      secrets: [token]
    command: ["sleep", "infinity"]
    init: true
  kit-own:
    build:
      <<: *build
      dockerfile: kit.Dockerfile
    command: ["sleep", "infinity"]
    init: true
secrets:
  token:
    environment: KIT_BUILD_TOKEN
"""
DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${{BASE_IMAGE}}
RUN --mount=type=cache,target=/root/.cache/kit echo run >> /root/.cache/kit/runs && cp /root/.cache/kit/runs /cache-runs
RUN --mount=type=secret,id=token test -s /run/secrets/token && sha256sum < /run/secrets/token | cut -d' ' -f1 > /token
COPY{link} . /app/
"""


@pytest.fixture(scope="module", autouse=True)
def clean(fleet):
    fleet.wipe()
    yield
    fleet.wipe()


@pytest.fixture(scope="module")
def engine(fleet) -> int:
    """The builder's docker engine major version: its BuildKit knows `COPY --link` from docker 23 on."""
    return int(fleet.ssh(fleet.hosts[0], "docker version -f '{{.Server.Version}}'").split(".")[0])


def make_project(root: Path, marker: str, link: bool, syntax: str = "") -> Path:
    """The project, and beside it the file a committed link points at (as a key under the operator's home)."""
    outside = root / "home/op/.ssh/id_ed25519"
    outside.parent.mkdir(parents=True)
    outside.write_text(f"{marker}\n")
    app = root / "project/app"
    dockerfile = syntax + DOCKERFILE.format(link=" --link" if link else "")
    files = {"compose.yaml": COMPOSE, "app/Dockerfile": dockerfile, "app/kit.Dockerfile": dockerfile,
             "app/.dockerignore": "# docker's own rules\n./secrets.env\n*.[pP][eE][mM]\n",
             "app/kit.Dockerfile.dockerignore": "app.py\nDockerfile\n", "app/app.py": "print('kit')\n",
             "app/secrets.env": "TOKEN=not-for-the-image\n", "app/key.PEM": "k\n", "app/sub/cert.pem": "c\n",
             "app/sub/data.txt": "d\n"}
    for name, text in files.items():
        path = root / "project" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (app / "deploy_key").symlink_to("../../home/op/.ssh/id_ed25519")  # committed by mistake
    return root / "project"


def deploy(fleet, project: Path, token: str, images: Path, *args: str):
    data = {"stack": str(project), **SETTINGS, "stack_secrets": ["KIT_BUILD_TOKEN"], "image_cache_dir": str(images)}
    return fleet.deploy(*args, *[arg for key, value in data.items() for arg in (
        "--data", f"{key}={value if isinstance(value, str) else json.dumps(value)}")],
        env={"KIT_BUILD_TOKEN": token})


def listing(fleet, record, tag: str) -> dict[str, str]:
    """Path under /app -> its type (f, d, l) in TAG as the host holds it."""
    output = fleet.ssh(record, f"docker run --rm --network none {tag} find /app -mindepth 1 -printf '%P %y\\n'")
    return dict(line.split() for line in output.splitlines())


def holding(fleet, record, needle: str) -> str:
    """The files under the host's /var/lib/docker (images, layers, BuildKit's context snapshots) holding NEEDLE."""
    return fleet.ssh(record, f"grep -rlF --binary-files=text {shlex.quote(needle)} /var/lib/docker || true",
                     timeout=300)


def test_the_image_holds_what_dockers_rules_keep_and_a_link_out_of_the_context_is_never_followed(
        fleet, tmp_path, engine):
    marker, token = f"KEY-{secrets.token_hex(16)}", f"tok-{secrets.token_hex(16)}"
    project, images = make_project(tmp_path, marker, link=engine >= 23), tmp_path / "images"
    with ArgvWatch([token]) as watch:
        run = deploy(fleet, project, token, images)
    assert run.returncode == 0, run.output[-3000:]
    assert watch.hits == [] and token not in run.output  # build.secrets: in no argv, not in the log
    tags = {}
    for service in ("kit", "kit-own"):  # one build per fleet, on the builder
        (tags[service],) = re.findall(rf"image (kit:[0-9a-f]{{16}}): building service {service} on ml_env_builder",
                                      run.output)
    assert len(set(tags.values())) == 2
    app = project / "app"
    kept = {"kit": context_paths(app, ignore_patterns((app / ".dockerignore").read_text())),
            "kit-own": context_paths(app, ignore_patterns((app / "kit.Dockerfile.dockerignore").read_text()))}
    assert kept["kit"] == [".dockerignore", "Dockerfile", "app.py", "deploy_key", "kit.Dockerfile",
                           "kit.Dockerfile.dockerignore", "sub", "sub/cert.pem", "sub/data.txt"]
    assert kept["kit-own"] == [".dockerignore", "deploy_key", "key.PEM", "kit.Dockerfile",
                               "kit.Dockerfile.dockerignore", "secrets.env", "sub", "sub/cert.pem", "sub/data.txt"]
    for record in fleet.hosts:
        for service, tag in tags.items():
            found = listing(fleet, record, tag)
            assert sorted(found) == kept[service]  # docker's rules, and the tag's view of them, agree
            assert found["deploy_key"] == "l" and found["sub"] == "d"  # the link went as a link
            probe = fleet.ssh(record, f"docker run --rm --network none {tag} sh -c "
                                      "'readlink /app/deploy_key; cat /cache-runs /token'").split()
            assert probe == ["../../home/op/.ssh/id_ed25519", "run", hashlib.sha256(token.encode()).hexdigest()]
        assert holding(fleet, record, marker) == ""  # the key's content: in no layer, no build context
        assert holding(fleet, record, token) == ""  # the secret: in no layer
    for archive in images.glob("kit-*.tar.gz"):
        content = gzip.decompress(archive.read_bytes())
        assert marker.encode() not in content and token.encode() not in content
    again = deploy(fleet, project, token, images)
    assert again.returncode == 0, again.output[-3000:]
    assert "building service" not in again.output  # the tags name the content: nothing to build


def test_what_the_builders_engine_lacks_fails_naming_the_service_and_the_feature(fleet, tmp_path, engine):
    if engine >= 23:
        pytest.skip("the builder's BuildKit has COPY --link: the image test above used it")
    project = make_project(tmp_path, "KEY-unused", link=True)
    run = deploy(fleet, project, "tok", tmp_path / "images")
    assert run.returncode != 0
    for record in fleet.hosts:
        message = run.report[record.name]["failure"]["message"]
        assert re.search(r"service kit(-own)?: its Dockerfile uses `COPY --link` \(line 5\), which the Dockerfile "
                         r"frontend of ml_env_builder '[^']+' does not support", message), message


def test_a_syntax_frontend_the_builder_cannot_fetch_is_named(fleet, tmp_path):
    frontend = f"{registry.address_of(fleet.fleet.gateway)}/mlstack/no-such-dockerfile:1.7"  # the fleet's own
    project = make_project(tmp_path, "KEY-unused", link=False, syntax=f"# syntax={frontend}\n")
    run = deploy(fleet, project, "tok", tmp_path / "images")
    assert run.returncode != 0
    for record in fleet.hosts:
        message = run.report[record.name]["failure"]["message"]
        assert re.search(rf"service kit(-own)?: its Dockerfile names the frontend image {re.escape(frontend)} "
                         r"\(`# syntax=`\), which BuildKit on ml_env_builder '[^']+' must fetch from its registry, "
                         "and that failed: ", message), message
