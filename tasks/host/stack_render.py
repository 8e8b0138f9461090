"""The stack's files as the deploy writes them on a host (tasks/host/stack.py has the whole picture): the
generated override `compose.mlstack.yml` (the ML env, models, GPUs and mlstack.* labels of each service), the one
`.env` (compose's own settings, the values compose interpolates, then the project's own entries) with
`.env.digest` (scrypt fingerprints, the host's salt), and `.mlstack-files` (sha256 and path of each file pushed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import HostConfig
from ..control.caches import Remembered, atomic_write, once
from ..control.compose_project import (
    BASE_IMAGE_VARIABLE,
    OVERRIDE,
    ComposeProject,
    StackError,
)
from ..control.hub import Snapshot
from ..secrets import SALT, fingerprint
from .gpu_checks import Gpu, assign_gpus
from .gpus import device_reservation
from .ml_env import EnvPlan, NoEnv
from .stack_images import ServiceImage

HF_HOME = "/root/.cache/huggingface"


MANIFEST = ".mlstack-files"
SHIPPED_MODE = 0o644  # a project file's mode on hosts unless its source's says otherwise (`shipped_mode`)


def mode_lines(modes: dict[str, int]) -> str:
    """MODES (path -> mode) as `.mlstack-files` records them after the sha256 lines: `# mode 0600 PATH`, a
    comment to `sha256sum -c`, so that a mode-only change is a change of the project (pushed again, a release
    of its own)."""
    return "".join(f"# mode {modes[path]:04o} {path}\n" for path in sorted(modes))


FINGERPRINT = re.compile(r"[0-9a-f]{32}")  # `fingerprint`'s, hex
SALT_LINE = re.compile(rf"^# salt ({SALT.pattern})$", re.M)  # .env.digest's first line


def escape(value: str) -> str:
    """VALUE as compose must read it literally (no `$` interpolation)."""
    return value.replace("$", "$$")


def dotenv_line(key: str, value: str) -> str:
    """One `.env` line compose reads back as exactly VALUE, for `env_file:` and `${VAR}` alike.

    Double quotes with `\\`, `"`, `$` and newline escaped (rehearsal/compose-facts.md has the proof):
    unquoted values lose ` #…` and expand `$X`; single quotes still treat `\\'` as an escape.
    """
    if "\0" in value:
        raise StackError(f"{key}: a NUL character cannot be passed through .env")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("\n", "\\n")
    return f'{key}="{escaped}"'


def short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Rendered:
    override: str  # compose.mlstack.yml
    dotenv: str  # .env (secrets: never logged)
    digest: str  # .env.digest: key=hash per line
    files: dict = field(hash=False, repr=False)  # relative path -> content: the project's files and the override
    manifest: str = ""  # .mlstack-files: sha256 and path of each of FILES, then `# mode` lines (`mode_lines`)
    labels: dict = field(hash=False, default_factory=dict)  # service -> the mlstack.* labels it carries
    modes: dict = field(hash=False, default_factory=dict)  # relative path -> mode on the host, where not 0644


def compose_values(config: HostConfig, secrets: dict[str, str]) -> dict[str, str]:
    """What compose interpolates the project with: the runtime base image ref, stack_env, the secrets."""
    return {BASE_IMAGE_VARIABLE: config.ml_env_base_image, **config.stack_env, **secrets}


def digest_salt(config: HostConfig, digest: str | None) -> str:
    """The salt of the host's `.env.digest` (DIGEST); for a host without one, the control node's own (made
    once, in `image_cache_dir`), so hosts it deployed share one and each value is fingerprinted once."""
    found = SALT_LINE.search(digest or "")
    if found:
        return found.group(1)

    def control_salt() -> str:
        path = Path(config.image_cache_dir).expanduser() / "env-digest.salt"
        salt = path.read_text().strip() if path.exists() else ""
        if not SALT.fullmatch(salt):
            salt = os.urandom(16).hex()
            atomic_write(path, salt)
        return salt

    return once(("salt", config.image_cache_dir), control_salt)


class PublicFingerprints:
    """Fingerprints of the deploy's own values (`public_keys`: no secret), remembered on the control node in
    `<image_cache_dir>/env-digest.public.json` (salt and value -> fingerprint), so that a run that changes none
    of them computes no scrypt for them. A secret's or a project `.env` entry's fingerprint is never kept."""

    def __init__(self, path: Path):
        self.remembered = Remembered(path, FINGERPRINT)

    def __call__(self, value: str, salt: str) -> str:
        return self.remembered(f"{salt} {value}", lambda: fingerprint(value, salt))


def public_keys(config: HostConfig) -> set[str]:
    """The `.env` keys whose values are the deploy's own and no secret: compose's settings (also in the project's
    labels and files) and the runtime base image's reference, unless stack_env or a secret sets that key."""
    return ({"COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES", BASE_IMAGE_VARIABLE}
            - set(config.stack_env) - set(config.stack_secrets))


def public_fingerprints(config: HostConfig) -> PublicFingerprints:
    path = Path(config.image_cache_dir).expanduser() / "env-digest.public.json"
    return once(("public fingerprints", str(path)), lambda: PublicFingerprints(path))


def render_dotenv(project: ComposeProject, config: HostConfig, values: dict[str, str], salt: str
                  ) -> tuple[str, str, dict[str, str]]:
    """The host's one `.env`: the deploy's keys (compose's own settings, then VALUES), then each entry of the
    project's `.env` as written unless the deploy sets its key; with `.env.digest` and key -> fingerprint.
    The deploy's keys come first, so an entry of the project's that refers to one reads the deploy's value."""
    ours = {"COMPOSE_FILE": ":".join((*project.files, OVERRIDE)), "COMPOSE_PROJECT_NAME": project.name,
            "COMPOSE_PROFILES": ",".join(config.stack_profiles), **values}
    theirs = {key: entry for key, entry in project.dotenv.items() if key not in ours}
    public, remembered = public_keys(config), public_fingerprints(config)
    fingerprints = {**{key: (remembered if key in public else fingerprint)(value, salt) for key, value in ours.items()},
                    **{key: fingerprint(entry, salt) for key, entry in theirs.items()}}
    dotenv = "".join(dotenv_line(key, value) + "\n" for key, value in ours.items())
    dotenv += "".join(entry + "\n" for entry in theirs.values())
    digest = f"# salt {salt}\n" + "".join(f"{key}={value}\n" for key, value in fingerprints.items())
    return dotenv, digest, fingerprints


def mount_env(config: HostConfig, env: EnvPlan | NoEnv, volumes: list[dict], environment: dict[str, str],
              ours: dict[str, str]) -> None:
    """The ML env, read-only at /root/.local, for a service of ml_services that uses it: such a service is what
    makes the env wanted (env_wanted), so ENV is an EnvPlan."""
    if not isinstance(env, EnvPlan):
        raise TypeError(f"a service mounts the ML env, yet none is planned: {env!r}")
    volumes.append({"type": "bind", "source": escape(f"{config.ml_env_dir}/envs/{env.wanted}"),
                    "target": "/root/.local", "read_only": True})
    environment.update({key: escape(value) for key, value in env.environment().items()})
    ours["mlstack.env-id"] = env.wanted


def override_text(services: dict) -> str:
    """compose.mlstack.yml. Like hosts render like SERVICES: dumped once per deploy (PyYAML's emitter is pure
    Python, ~10 ms a call; libyaml's folds long quoted strings differently, which would change the file on hosts)."""
    return once(("override", repr(services)), lambda: (
        "# Generated by the deploy (tasks/host/stack.py): the ML env, models, GPUs and labels.\n"
        + yaml.safe_dump({"services": services}, sort_keys=False, width=1000)))


def render(project: ComposeProject, config: HostConfig, env: EnvPlan | NoEnv, snapshots: list[Snapshot],
           images: dict[str, ServiceImage], gpus: list[Gpu], secrets: dict[str, str], salt: str) -> Rendered:
    values = compose_values(config, secrets)
    dotenv, digest, fingerprints = render_dotenv(project, config, values, salt)
    commits = {snapshot.spec.repo_id: snapshot.commit for snapshot in snapshots}
    services, labels = {}, {}
    for name, definition in project.services.items():
        service: dict = {}
        ours: dict[str, str] = {}
        environment: dict[str, str] = {}
        volumes: list[dict] = []
        image = images.get(name)
        if image and image.source == "build":
            service["image"] = image.reference
        if image and image.source == "ship":
            service["pull_policy"] = "never"  # the deploy brings it: the host needs no way to the registry
        if image:
            ours["mlstack.image"] = escape(image.label)
        uses = config.ml_services.get(name)
        if uses and uses.ml_env:
            mount_env(config, env, volumes, environment, ours)
        if uses and uses.models:
            volumes.append({"type": "bind", "source": escape(config.model_cache_dir), "target": HF_HOME,
                            "read_only": True})
            environment.update({"HF_HOME": HF_HOME, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
            used = {var: config.service_models[var] for var in uses.models}
            for var, repo_id in used.items():
                environment[var] = escape(repo_id)
                environment[f"{var}_REVISION"] = commits[repo_id]
            ours["mlstack.models"] = escape(",".join(f"{repo}@{commits[repo]}" for repo in sorted(set(used.values()))))
        given = assign_gpus(gpus, name, config.service_gpus[name]) if name in config.service_gpus else []
        if given:
            service["deploy"] = {"resources": {"reservations": device_reservation(given)}}
        if environment:
            service["environment"] = environment
        if volumes:
            service["volumes"] = volumes
        read = {var: fingerprints[var] for var in sorted(project.reads(name)) if var in fingerprints}
        ours["mlstack.config"] = short_hash([definition, service, ours, read])
        service["labels"] = ours
        services[name], labels[name] = service, ours
    override = override_text(services)
    files = {**project.files_to_ship(), OVERRIDE: override.encode()}
    hashes = {**project.file_hashes(), OVERRIDE: hashlib.sha256(files[OVERRIDE]).hexdigest()}
    modes = {path: mode for path, mode in project.file_modes().items() if mode != SHIPPED_MODE}
    manifest = "".join(f"{hashes[path]}  {path}\n" for path in sorted(files)) + mode_lines(modes)
    return Rendered(override, dotenv, digest, files, manifest, labels, modes)
