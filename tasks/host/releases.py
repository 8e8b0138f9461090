"""The stack's releases on a host: what each successful deploy put in place, kept so that a rollback can put
it back without building or downloading anything.

A release is named by what the stack runs (`rel-` and 16 hex digits of a sha256): the compose project's files
and .env as fingerprinted (`.mlstack-files`, `.env.digest`), the env id, every model's commit and every
service's image. Deploying the same again is the same release; a change of settings that changes none of
these (a directory's mode, a hash check) makes no new one. The record also says when, from which control node
and under which settings (their digest) it was first recorded. `files/host/releases.sh` keeps them below
`<stack_root>/releases/` (root's, 0700); `current` links to the running one.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import socket
import time
from dataclasses import dataclass, field

from pyinfra import host
from pyinfra.api import FactBase, operation

from ..config import HostConfig
from .failure import step
from .probe import ProbePart
from .programs import program

RELEASE_ID = re.compile(r"rel-[0-9a-f]{16}")
IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")


def releases_dir(config: HostConfig) -> str:
    return f"{config.stack_root}/releases"


@dataclass(frozen=True)
class Release:
    id: str
    project: str  # compose's project name
    files: str  # sha256 of .mlstack-files and .env.digest: the project's files and its .env's values
    env: str | None  # the env id the services mount, None without an env
    models: dict = field(hash=False)  # model cache folder (`models--org--name`) -> commit
    images: dict = field(hash=False)  # service -> the image the deploy gave it (a tag, or a reference with digest)
    settings: str  # sha256 (16 hex) of the host's settings when it was first recorded (not part of its name)
    profiles: tuple = ()  # the compose profiles it runs (also in its .env: COMPOSE_PROFILES)
    created: str = ""  # UTC, when this release was first recorded
    control_node: str = ""  # user@machine that recorded it
    activated: str = ""  # UTC, when it last became the running release (read from the host)
    image_ids: dict = field(hash=False, default_factory=dict)  # service -> image id, read on the host

    def record(self) -> dict:
        return {"id": self.id, "project": self.project, "files": self.files, "env": self.env, "models": self.models,
                "images": self.images, "settings": self.settings, "profiles": list(self.profiles),
                "created": self.created,
                "control_node": self.control_node}


def new_release(project: str, files: str, env: str | None, models: dict[str, str], images: dict[str, str],
                settings: str, profiles: tuple[str, ...] = ()) -> Release:
    """The release these make, named by its content; the time and the control node only describe it."""
    content = {"project": project, "files": files, "env": env, "models": models, "images": images}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    return Release(f"rel-{digest}", project, files, env, dict(models), dict(images), settings, tuple(profiles),
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   f"{getpass.getuser()}@{socket.gethostname()}")


def settings_digest(config: HostConfig) -> str:
    """The host's settings as one digest (names of secrets, never values: the config holds no value)."""
    return hashlib.sha256(config.dump_json().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ReleasesState:
    releases: dict = field(default_factory=dict)  # id -> Release, oldest activation first
    current: str | None = None

    def previous(self) -> Release | None:
        """The release that ran before the current one: the most recently activated of the others."""
        others = [release for release in self.releases.values() if release.id != self.current]
        return others[-1] if others else None


class ReleasesFact(FactBase):
    """The releases kept on the host (`files/host/releases.sh list`). What the host says is checked: ids,
    image ids and the record's fields; a release that does not read back whole is left out."""

    def command(self, releases_dir: str) -> str:
        return program("releases.sh", "list", releases_dir)

    def process(self, output: list[str]) -> ReleasesState:
        found: dict[str, dict] = {}
        current = None
        entry: dict | None = None
        for line in output:
            kind, _, value = line.partition(" ")
            if kind == "release":
                entry = found.setdefault(value, {"images": {}}) if RELEASE_ID.fullmatch(value) else None
            elif kind == "current" and RELEASE_ID.fullmatch(value):
                current = value
            elif entry is not None and kind == "activated":
                entry["activated"] = value if re.fullmatch(r"[0-9TZ:-]{20}", value) else ""
            elif entry is not None and kind == "json":
                entry["json"] = value
            elif entry is not None and kind == "image":
                service, _, image_id = value.partition(" ")
                if IMAGE_ID.fullmatch(image_id):
                    entry["images"][service] = image_id
        releases = [release for name, entry in found.items() if (release := _release(name, entry))]
        releases.sort(key=lambda release: release.activated)
        return ReleasesState({release.id: release for release in releases},
                             current if current in {release.id for release in releases} else None)


def _release(name: str, entry: dict) -> Release | None:
    try:
        record = json.loads(entry.get("json", ""))
        release = Release(name, str(record["project"]), str(record["files"]), record["env"],
                          {str(repo): str(commit) for repo, commit in record["models"].items()},
                          {str(service): str(image) for service, image in record["images"].items()},
                          str(record["settings"]), tuple(str(name) for name in record.get("profiles", [])),
                          str(record.get("created", "")),
                          str(record.get("control_node", "")), entry.get("activated", ""), entry["images"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if record.get("id") != name or (release.env is not None and not isinstance(release.env, str)):
        return None
    return release


def probe_part(config: HostConfig) -> ProbePart:
    return ProbePart("releases", ReleasesFact, {"releases_dir": releases_dir(config)})


@operation(is_idempotent=False)
def record_release(releases_dir: str, release: Release, compose_dir: str):
    """Keep the release the stack now runs (its project's files and .env, its images' ids) and mark it current."""
    yield program("releases.sh", "record", releases_dir, release.id, compose_dir, release.project,
                  json.dumps(release.record(), sort_keys=True))


@step("Release")
def converge(config: HostConfig, state: ReleasesState, plan) -> None:
    """Record the release the stack now runs, once its health gate passed (a later operation of the same host:
    it runs only if every earlier one succeeded); nothing when it is already the current one."""
    if plan is None or plan.release is None:
        return  # the stack step failed this host
    release = plan.release
    if release.id == state.current and not plan.converge:
        return
    kept = "kept: made current again" if release.id in state.releases else "new"
    host.log(f"release {release.id} ({kept})")
    record_release(name=f"Release {release.id}", releases_dir=releases_dir(config), release=release,
                   compose_dir=config.compose_project_dir)
