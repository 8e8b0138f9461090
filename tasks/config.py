"""Host data -> a typed, validated config per host, before any host is changed.

Defaults live here, in `HostConfig` (declared with tasks/settings.py); the checks say what a valid value is.
Only the settings are checked here (no docker needed): the compose project against them is
tasks/control/project_checks.py, and validating the whole fleet (both) is tasks/validation.py.
Every problem on every host is reported at once, each naming the host, the setting, the value
and what is expected. Keys that are neither ours nor pyinfra's (connector data, global
arguments) are typos and fail too, with the closest known key as a suggestion.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Optional

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from pyinfra.api.arguments import all_global_arguments
from pyinfra.api.connectors import get_all_connectors
from pyinfra.api.exceptions import PyinfraError

from . import secrets, settings
from .paths import FILES, STACKS
from .settings import KEY, MISSING, Check, Settings, SettingsError, written

MAX_ID = 4294967294  # 2**32 - 2: (uid_t)-1 means "unchanged" to chown(2)
MAX_KEEP_ENVS = 20


class ConfigError(PyinfraError):
    """Invalid inventory data; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid inventory data, nothing was changed:\n  " + "\n  ".join(problems))


# A configured directory holds only these characters: a ':' or ',' splits a `docker -v` / `--mount` spec, a '$'
# is compose interpolation, and blanks, quotes, '#' or '\' change a shell word or a .env line.
PATH_CHARACTERS = re.compile(r"[A-Za-z0-9._+@/-]+")
_BREAKS = {":": "docker -v", ",": "docker --mount", "$": "compose", "#": "a .env line"}
# No configured directory is, or lies below, one of these: the deploy chowns and chmods its directories (and
# the parents it creates), which would hand a system directory to the configured owner.
SYSTEM_TREES = ("/etc", "/proc", "/sys", "/dev", "/boot", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
                "/libx32", "/root", "/run", "/var/run", "/var/lib/docker", "/var/lib/containerd", "/var/lib/dpkg",
                "/var/lib/apt", "/var/log", "/snap", "/lost+found", "/var/spool", "/var/lib/sudo", "/var/lib/systemd",
                "/var/mail", "/var/backups")
# Configured directories lie below these (an allow-list: no list of system places is ever complete), or below a
# directory named in `allow_paths_outside`, which confirms that the deploy may own it.
ALLOWED_TREES = ("/srv", "/opt", "/data", "/mnt", "/var/lib/mlstack")
# Nor below these world-writable temp dirs: any local user could plant the path (or a link on it) first.
WORLD_WRITABLE_TREES = ("/tmp", "/var/tmp", "/dev/shm")
# These may hold a deploy's directories below them, but are never one: it would chown all they hold.
SHARED_PARENTS = ("/home", "/var", "/var/lib", "/srv", "/opt", "/data", "/mnt", "/media")


def is_within(path: str, tree: str) -> bool:
    """PATH is TREE or lies below it (both normalised)."""
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("expected an absolute path such as '/srv/mlstack'")
    bad = PATH_CHARACTERS.sub("", value)
    if bad:
        raise ValueError(f"expected a path of letters, digits and . _ - + @ / only "
                         f"({bad[0]!r} would break {_BREAKS.get(bad[0], 'a shell word or a .env line')})")
    normal = os.path.normpath(value).replace("//", "/")
    if normal != value:
        raise ValueError(f"expected a normalised path (did you mean {normal!r}?)")
    if value == "/":
        raise ValueError("expected a directory below '/', not '/' itself")
    if "/.ssh/" in value + "/":
        raise ValueError("expected a path without a .ssh directory (SSH keys: the deploy would chown them)")
    for tree in WORLD_WRITABLE_TREES:
        if is_within(value, tree):
            raise ValueError(f"expected a directory outside {tree} (world-writable: a local user could plant "
                             "the path first)")
    for tree in SYSTEM_TREES:
        if is_within(value, tree):
            raise ValueError(f"expected a directory outside {tree} (a system location: the deploy would chown it)")
    if value in SHARED_PARENTS:
        raise ValueError(f"expected a directory of its own, such as '{value}/mlstack', not {value} itself "
                         "(the deploy would chown it)")
    return value


def _int_in(low: int, high: int, expected: str):
    """A validator of integers from LOW to HIGH; digit strings (from `--data`) count, booleans do not."""

    def validate(value: Any) -> int:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(expected)
        return value

    return validate


_id = _int_in(0, MAX_ID, f"expected an integer id from 0 to {MAX_ID}")


def _mode(value: Any) -> int:
    """'0755', '755' or pyinfra-style 755 (octal digits); 0o755 would be the int 493 and is refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not re.fullmatch(r"0?[0-7]{3,4}", str(value)):
        raise ValueError("expected an octal mode such as '0755'")
    return int(str(value), 8)


def _control_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("/", "~/")):
        raise ValueError("expected an absolute path on the control node, or one starting with '~/'")
    return value


class RequirementsError(ValueError):
    """A requirements file the ML env cannot be built from."""


def requirement_names(requirements: str) -> list[str]:
    """Canonical distribution names of the top-level requirements (options and comments skipped)."""
    names: list[str] = []
    for number, raw in enumerate(requirements.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            names.append(canonicalize_name(Requirement(line).name))
        except InvalidRequirement as error:
            raise RequirementsError(f"requirements line {number}: {raw!r}: {error}") from None
    if not names:
        raise RequirementsError("the requirements file names no package: an empty ML env is certainly a mistake")
    return names


@cache
def read_requirements(path: str) -> str:
    return Path(path).read_text()


@cache  # every host of a fleet names the same file, checked once
def _package_names(path: str) -> tuple[str, ...]:
    return tuple(requirement_names(read_requirements(path)))


@cache
def shipped_stacks() -> tuple[str, ...]:
    """The compose projects under files/stacks/, by name."""
    return tuple(sorted(path.name for path in STACKS.iterdir() if path.is_dir()))


def _requirements(value: Any) -> str:
    """A file name in files/ or a path on the control node, naming at least one package."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a requirements file: a name in files/ or a path on the control node")
    path = FILES / value if "/" not in value else Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"expected a requirements file, but {path} does not exist")
    try:
        _package_names(str(path))
    except RequirementsError as error:
        raise ValueError(f"expected a usable requirements file: {path}: {error}") from None
    return str(path)


ENV_ID = re.compile(r"env-[0-9a-f]{16}")


def _env_id(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not ENV_ID.fullmatch(value):
        raise ValueError("expected an env id such as 'env-0123456789abcdef' (as shown by a deploy), or None")
    return value


_keep = _int_in(0, MAX_KEEP_ENVS, f"expected a number of previous envs to keep, from 0 to {MAX_KEEP_ENVS}")


def _image(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._/:@-]*", value):
        raise ValueError("expected a docker image reference such as 'python:3.11-slim-bookworm'")
    return value


def _engine(value: Any) -> str:
    if value == "" or isinstance(value, str) and re.fullmatch(r"(unix|tcp|ssh)://\S+", value):
        return value
    raise ValueError("expected '' (the control node's docker engine, or DOCKER_HOST) or a docker URL "
                     "such as 'ssh://root@gpu-01' or 'unix:///run/docker.sock'")


def _url(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"(https?|file)://\S+", value):
        raise ValueError("expected an http(s):// or file:// URL")
    unset = [name for name in secrets.references(value) if name not in os.environ]
    if unset:
        raise ValueError(f"expected ${{{unset[0]}}} to be set in the control node's environment")
    return value


def _list_of(check):
    def validate(value: Any) -> list[str]:
        if isinstance(value, str):  # from --data: comma-separated
            value = [item for item in value.split(",") if item]
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list")
        return [check(item) for item in value]
    return validate


def _optional_url(value: Any) -> str:
    return "" if value == "" else _url(value)


def _endpoint(value: Any) -> str:
    """`hf_endpoint`: '' or a URL whose credentials, if any, are `${VAR}` from the control node's environment."""
    if value == "":
        return ""
    value = _url(value)
    if secrets.literal_credentials(value):
        raise ValueError("expected credentials as ${VAR} from the control node's environment, "
                         "not written out")
    return value


def _host_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9.-]+(:\d{1,5})?", value):
        raise ValueError("expected host names such as 'pypi.corp' or 'pypi.corp:8443'")
    return value


# huggingface_hub's validate_repo_id: "name" or "namespace/name", each part 1 to 96 of [A-Za-z0-9_.-]
# starting and ending with a word character (here: starting with a letter or digit), no "--" or "..", no ".git" end.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")
MAX_REVISION = 255


def _repo_id(value: Any) -> str:
    if not isinstance(value, str) or not REPO_ID.fullmatch(value) or "--" in value or ".." in value \
            or value.endswith(".git"):
        raise ValueError("expected a HuggingFace repo id such as 'sentence-transformers/all-MiniLM-L6-v2'")
    return value


def is_revision(value: Any) -> bool:
    """A branch, tag or commit name as huggingface_hub takes it: `/`-separated parts of [A-Za-z0-9_.-], none of
    them `.` or `..` and no `..` anywhere (nothing that could climb a path), no leading `-` (an option to a
    program), at most 255 characters."""
    return (isinstance(value, str) and len(value) <= MAX_REVISION and not value.startswith("-")
            and re.fullmatch(r"[\w.-]+(?:/[\w.-]+)*", value, flags=re.ASCII) is not None and ".." not in value
            and "." not in value.split("/"))


def _revision(value: Any) -> str:
    if not is_revision(value):
        raise ValueError("expected a branch, tag or full commit sha such as 'main', 'v1.0' or 40 hex digits")
    return value


def _patterns(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(item, str) and item for item in value):
        raise ValueError("expected None or a list of glob patterns such as ['*.json', '*.safetensors']")
    return tuple(value)  # hashable: a spec keys the control node's once-per-deploy work


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", value):
        raise ValueError("expected an environment variable name such as 'RERANKING_MODEL'")
    return value


def _dotenv_name(value: Any) -> str:
    """A name for the stack's .env: docker compose reads that file for its own COMPOSE_* / DOCKER_* settings."""
    name = _env_name(value)
    if name.startswith(("COMPOSE_", "DOCKER_")):
        raise ValueError("expected a variable compose itself does not read "
                         "(COMPOSE_* and DOCKER_* change how docker compose runs)")
    return name


def _secret_name(value: Any) -> str:
    """A `stack_secrets` name: read from the control node's environment, so it must be set there now, before
    anything is built or changed."""
    name = _dotenv_name(value)
    if name not in os.environ:
        raise ValueError(f"expected {name} to be set in the control node's environment (stack_secrets are read "
                         "from it: export it before the deploy)")
    return name


def _env_name_or_profile(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", value):
        raise ValueError("expected compose profile names such as 'agents'")
    return value


def _choice(*choices: str):
    def validate(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(repr(choice) for choice in choices))
        return value
    return validate


def _fanout_address(value: Any) -> str:
    """An IP address a host's peers reach it on (no name: the swarm never asks a resolver), or ""."""
    if value == "":
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("expected an IP address of the host on the fleet's network, such as '10.0.4.21'") from None


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):  # from --data
        return value.lower() == "true"
    raise ValueError("expected True or False")


def _stack(value: Any) -> str:
    """A compose project directory on the control node: an absolute path, a path starting with `./` or `../`
    (from the directory the deploy runs in; made absolute here), or the name of a project under files/stacks/."""
    if isinstance(value, str) and value.startswith(("./", "../")):
        value = os.path.normpath(Path.cwd() / value)
    if isinstance(value, str) and value.startswith("/") and Path(value).is_dir():
        return value
    names = shipped_stacks()
    if isinstance(value, str) and value in names:
        return value
    raise ValueError("expected a compose project directory: an absolute path, one starting with ./ or ../ (from "
                     f"the directory the deploy runs in), or a name under files/stacks/ ({', '.join(names)})")


def _compose_file(value: Any) -> str:
    """A compose file of the project, relative to its directory (COMPOSE_FILE joins them with ':')."""
    if (not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_./-]*", value)
            or ".." in value.split("/")):
        raise ValueError("expected compose file names relative to the project directory, such as "
                         "'docker-compose.yml' or 'deploy/gpu.yml' (letters, digits, '_', '.', '-', '/'; no '..')")
    return value


def _http_check(value: Any) -> str:
    """A URL the control node asks once a host's services are healthy; `{host}` is that host's address."""
    if not isinstance(value, str) or not re.fullmatch(
            r"https?://[A-Za-z0-9.:\[\]_-]+(/[A-Za-z0-9._~/?&=%+-]*)?", value.replace("{host}", "host")):
        raise ValueError("expected http(s) URLs such as 'http://{host}:8181/health' ({host}: the host's address)")
    return value


GPU_REQUEST = ("expected 'all', a number of GPUs from 1 to 64, or a list of distinct GPU indices such as [0, 1]")


def _gpu_request(value: Any) -> str | int | tuple[int, ...]:
    """One service's GPUs: "all" of the host's, a count (the lowest indices), or these indices."""
    if value == "all":
        return value
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 64 for i in value) \
                and len(set(value)) == len(value):
            return tuple(value)
        raise ValueError(GPU_REQUEST)
    return _int_in(1, 64, GPU_REQUEST)(value)


def _gpu_requests(value: Any) -> dict[str, str | int | tuple[int, ...]]:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError("expected a mapping of stack service -> 'all', a GPU count or a list of GPU indices")
    problems = []
    requests = {}
    for service, request in value.items():
        try:
            requests[service] = _gpu_request(request)
        except ValueError as error:
            problems.append(f"{service}: {request!r}: {error}")
    if problems:
        raise ValueError("; ".join(problems))
    return requests


def _batch(value: Any) -> str:
    text = str(value)
    if isinstance(value, bool) or not re.fullmatch(r"[1-9]\d*|([1-9]\d?|100)%", text):
        raise ValueError("expected a batch size: a number of hosts such as 5, or a percentage such as '25%'")
    return text


def _env_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(item, (str, int, float)) and not isinstance(item, bool)
                                               for item in value.values()):
        raise ValueError("expected a mapping of environment variable names to text values")
    return {_dotenv_name(key): str(item) for key, item in value.items()}


AbsolutePath = Annotated[str, Check(_path)]
NumericId = Annotated[int, Check(_id)]
OctalMode = Annotated[int, Check(_mode)]
ControlPath = Annotated[str, Check(_control_path)]
RequirementsFile = Annotated[str, Check(_requirements)]
EnvId = Annotated[Optional[str], Check(_env_id)]
KeepCount = Annotated[int, Check(_keep)]
ImageRef = Annotated[str, Check(_image)]
EngineUrl = Annotated[str, Check(_engine)]
IndexUrl = Annotated[str, Check(_optional_url)]
EndpointUrl = Annotated[str, Check(_endpoint)]
UrlList = Annotated[list[str], Check(_list_of(_url))]
HostList = Annotated[list[str], Check(_list_of(_host_name))]
FanoutAddress = Annotated[str, Check(_fanout_address)]
RepoId = Annotated[str, Check(_repo_id)]
Revision = Annotated[str, Check(_revision)]
Patterns = Annotated[Optional[tuple[str, ...]], Check(_patterns)]
Flag = Annotated[bool, Check(_flag)]


def _registry_credentials(value: Any) -> dict[str, str]:
    """Registry host[:port] -> `USER:${PASSWORD_VAR}` (the user may be a `${VAR}` too): the password is
    read from the control node's environment, never written in the inventory."""
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of registry host[:port] -> 'user:${PASSWORD_VAR}'")
    for registry, credentials in value.items():
        if not (isinstance(registry, str) and re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?", registry)):
            raise ValueError(f"{registry!r}: expected a registry host[:port] such as 'registry.corp:5000'")
        if not (isinstance(credentials, str)
                and re.fullmatch(r"(\$\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z0-9._@-]+):\$\{[A-Za-z_][A-Za-z0-9_]*\}",
                                 credentials)):
            raise ValueError(f"{registry}: expected 'user:${{PASSWORD_VAR}}', the password from the control "
                             "node's environment")
        unset = [name for name in secrets.references(credentials) if name not in os.environ]
        if unset:
            raise ValueError(f"{registry}: expected ${{{unset[0]}}} to be set in the control node's environment")
    return value


ModelVariables = Annotated[list[str], Check(settings.items(
    _env_name, "expected a list of service_models variables such as ['RERANKING_MODEL']"))]


class MlService(Settings):
    """One entry of `ml_services`: what the deploy adds to that compose service."""

    ml_env: Flag = True  # the env read-only at /root/.local, with PATH and PYTHONPATH
    models: ModelVariables = []  # service_models variables it reads


class ModelSpec(Settings):
    """One entry of `models`: a repo at a revision, optionally a subset of its files."""

    repo_id: RepoId
    revision: Revision = "main"
    repo_type: Annotated[str, Check(_choice("model", "dataset"))] = "model"
    allow_patterns: Patterns = None
    ignore_patterns: Patterns = None

    @property
    def folder(self) -> str:
        """The repo's folder in an HF cache (`models--org--name`)."""
        return "--".join([f"{self.repo_type}s", *self.repo_id.split("/")])

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


MlServices = Annotated[dict[str, MlService], Check(settings.mapping(
    settings.text("expected a service name"), settings.entry(MlService),
    "expected a mapping of stack service -> {ml_env, models}"))]
ModelSpecs = Annotated[list[ModelSpec], Check(settings.items(
    settings.entry(ModelSpec), "expected a list of models such as [{'repo_id': 'org/name', 'revision': '<commit>'}]"))]
ServiceModels = Annotated[dict[str, str], Check(settings.mapping(
    _env_name, settings.text("expected a repo_id of models"), "expected a mapping of environment variable -> repo_id"))]


@dataclass(frozen=True)
class DirectorySpec:
    setting: str
    path: str
    uid: int
    gid: int
    mode: int


class HostConfig(Settings):
    """Every setting of the deploy with its default: the one place defaults live. Override them per group
    (group_data/<group>.py beside the inventory), per host in the inventory, or per run with `--data k=v`.
    docs/settings.md documents each (a unit test keeps the two equal). Directory owners are numeric: a
    container's uid (often 1000) need not exist on the host."""

    # Your compose project: an absolute path on the control node, or a name under files/stacks/.
    stack: Annotated[str, Check(_stack)]
    # Its compose files, merged in order as `docker compose -f a -f b`; [] is what compose reads without -f.
    compose_files: Annotated[list[str], Check(_list_of(_compose_file))] = []
    # Compose profiles to enable; written to the host's .env as COMPOSE_PROFILES.
    stack_profiles: Annotated[list[str], Check(_list_of(_env_name_or_profile))] = []
    # Values compose interpolates the project with, over the project's own .env (name -> value).
    stack_env: Annotated[dict[str, str], Check(_env_map)] = {}
    # Names read from the control node's environment into the host's .env (mode 0600), over the project's own.
    stack_secrets: Annotated[list[str], Check(_list_of(_secret_name))] = []
    # What the deploy adds to each service named: the ML env (read-only at /root/.local) and the models it reads.
    ml_services: MlServices = {}
    # The GPUs each service gets (service -> "all", a count or a list of indices), reserved by UUID.
    service_gpus: Annotated[dict, Check(_gpu_requests)] = {}
    # URLs the control node asks once a host's services are healthy ({host}: the host's address).
    http_checks: Annotated[list[str], Check(_list_of(_http_check))] = []
    # Seconds a host's services get to become healthy after a change.
    health_timeout: Annotated[int, Check(_int_in(5, 3600, "expected seconds from 5 to 3600"))] = 180
    # Seconds any one command may run on a host before it is stopped and the host fails (probes, steps).
    host_command_timeout: Annotated[int, Check(_int_in(5, 86400, "expected seconds from 5 to 86400"))] = 1800
    # Seconds any one upload to a host may take, with what reads it there (env, model files, images).
    host_transfer_timeout: Annotated[int, Check(_int_in(5, 604800, "expected seconds from 5 to 604800"))] \
        = 21600
    # Registry images: "pull": each host pulls them; "ship": the builder pulls each once and sends it to hosts.
    image_source: Annotated[str, Check(_choice("pull", "ship"))] = "pull"
    # Logins for those registries (host[:port] -> "user:${PASSWORD_VAR}"), read from the control node's environment.
    registry_credentials: Annotated[dict[str, str], Check(_registry_credentials)] = {}
    # Where the control node keeps built and shipped image archives.
    image_cache_dir: ControlPath = "~/.cache/mlstack/images"

    # The stack root: parent of everything the deploy manages. A mode's default is the text one writes
    # (`written`), turned into an int by its check.
    stack_root: AbsolutePath = "/srv/mlstack"
    stack_root_uid: NumericId = 0
    stack_root_gid: NumericId = 0
    stack_root_mode: OctalMode = written("0755")
    # The pip --user ML environment store (versioned envs below it).
    ml_env_dir: AbsolutePath = "/srv/mlstack/ml-env"
    ml_env_dir_uid: NumericId = 0
    ml_env_dir_gid: NumericId = 0
    ml_env_dir_mode: OctalMode = written("0755")
    # The HuggingFace cache, mounted at /root/.cache/huggingface.
    model_cache_dir: AbsolutePath = "/srv/mlstack/hf-cache"
    model_cache_dir_uid: NumericId = 0
    model_cache_dir_gid: NumericId = 0
    model_cache_dir_mode: OctalMode = written("0755")
    # Where each host keeps the compose project: its files as they are, compose.mlstack.yml, .env.
    compose_project_dir: AbsolutePath = "/srv/mlstack/compose"
    compose_project_dir_uid: NumericId = 0
    compose_project_dir_gid: NumericId = 0
    compose_project_dir_mode: OctalMode = written("0750")
    # Directories outside /srv, /opt, /data, /mnt and /var/lib/mlstack that the four above may be or lie below:
    # naming one confirms the deploy may own it (system places stay refused).
    allow_paths_outside: Annotated[list[str], Check(_list_of(_path))] = []

    # The ML env's requirements: a file name in files/ or a path on the control node (built only when a
    # service of ml_services uses the env).
    ml_env_requirements: RequirementsFile = "requirements.ml.txt"
    # Pin an env id shown by an earlier deploy (rollback); None builds from the requirements.
    ml_env_id: EnvId = None
    # Previous envs kept on each host besides the active one.
    keep_envs: KeepCount = 2
    # Import-check the active env on every run, not only when switching (verify turns it on).
    ml_env_check_active: Flag = False
    # Hash every object of each host's env store and check each env's tree against its manifest, and repair what
    # differs (`verify --hashes` turns it on).
    ml_env_verify_hashes: Flag = False
    # The runtime base image the env is built on and checked in (same Python and glibc as the stack).
    ml_env_base_image: ImageRef = "python:3.11-slim-bookworm"
    # The docker engine that builds: "" is the control node's own (or DOCKER_HOST), or e.g. "ssh://root@gpu-01".
    ml_env_builder: EngineUrl = ""
    # Where the control node keeps built env artifacts and their objects.
    ml_env_cache_dir: ControlPath = "~/.cache/mlstack/ml-env"
    # Hosts feed hosts (tasks/host/fanout.py): "auto" sends what is new (env objects, model files, image archives)
    # to one host, which seeds a swarm of the others; "off" sends every host its own copy.
    fanout: Annotated[str, Check(_choice("auto", "off"))] = "auto"
    # The fan-out is used from this many hosts needing the same new files, of at least fanout_min_bytes.
    fanout_min_hosts: Annotated[int, Check(_int_in(2, 100000, "expected a number of hosts, 2 or more"))] = 3
    fanout_min_bytes: Annotated[int, Check(_int_in(0, 2**50, "expected a number of bytes, 0 or more"))] \
        = 64 * 2**20
    # The TCP port the swarm's peers listen on, on each host's fleet address, while a transfer step runs.
    fanout_port: Annotated[int, Check(_int_in(1024, 65535, "expected a TCP port from 1024 to 65535"))] \
        = 51871
    # The address the other hosts reach this host's peer on: "" is the host's SSH address when that is an IP address.
    fanout_address: FanoutAddress = ""
    # Package index for the env build; credentials as ${VAR} from the control node's environment.
    pip_index_url: IndexUrl = ""
    pip_extra_index_urls: UrlList = []
    pip_find_links: UrlList = []
    pip_trusted_hosts: HostList = []

    # HuggingFace models placed in every host's cache: {"repo_id", "revision", "repo_type", "allow_patterns",
    # "ignore_patterns"}. Pin a full commit sha for reproducible fleets.
    models: ModelSpecs = []
    # The stack's model settings (environment variable -> repo_id): each must be one of `models`.
    service_models: ServiceModels = {}
    # "control": the control node downloads once and sends hosts what they lack; "host": each host downloads.
    model_mode: Annotated[str, Check(_choice("control", "host"))] = "control"
    # The HF endpoint: "" is $HF_ENDPOINT or huggingface.co; credentials as ${VAR} ("control" mode only).
    hf_endpoint: EndpointUrl = ""
    # Send the control node's HF_TOKEN to a plain http:// endpoint too (by default only to https://).
    hf_token_over_http: Flag = False
    # Hash every model file on the hosts on each run (files just transferred are always hashed).
    model_verify_hashes: Flag = False
    # Where the control node keeps its HF cache in "control" mode.
    hf_control_cache_dir: ControlPath = "~/.cache/mlstack/hf"

    # Rollout (`mlstack rollout`): canary hosts first, then batches (a count or "25%"), stopping once more
    # than rollout_max_failures hosts have failed.
    rollout_canary: Annotated[int, Check(_int_in(0, 10000,
                                                           "expected a number of canary hosts, 0 or more"))] = 1
    rollout_batch: Annotated[str, Check(_batch)] = "25%"
    rollout_max_failures: Annotated[int, Check(_int_in(0, 10000,
                                                                 "expected a number of failed hosts, 0 or more"))] = 0

    def pip_options(self) -> dict:
        """pip's index settings, `${VAR}` references unexpanded (see tasks/secrets.py)."""
        return {"index_url": self.pip_index_url, "extra_index_urls": self.pip_extra_index_urls,
                "find_links": self.pip_find_links, "trusted_hosts": self.pip_trusted_hosts}

    def directories(self) -> list[DirectorySpec]:
        return [
            DirectorySpec(
                setting=name,
                path=getattr(self, name),
                uid=getattr(self, f"{name}_uid"),
                gid=getattr(self, f"{name}_gid"),
                mode=getattr(self, f"{name}_mode"),
            )
            for name in ("stack_root", "ml_env_dir", "model_cache_dir", "compose_project_dir")
        ]


# What a missing required setting is for, and how to give it.
REQUIRED = {"stack": "a value is required: your compose project's directory on the control node (e.g. "
                     "stack = \"./compose\" in the inventory, from the directory you run in, or --data stack=/path)"}
# Every default, as pyinfra data (`@deploy(data_defaults=...)`): what a team's own deploy reads from host.data.
DEFAULTS = HostConfig.defaults()


@cache  # asked for every host; pyinfra's connectors come from the installed packages' entry points, read once
def pyinfra_keys() -> frozenset[str]:
    """Data keys that belong to pyinfra (connector data, `_sudo`-style global arguments), not to us."""
    connector_keys = {key for connector in get_all_connectors().values() for key in getattr(connector, "data_meta", {})}
    return frozenset(connector_keys | {name for name, _ in all_global_arguments() if name.startswith("_")})



def _shown(value: Any) -> str:
    """VALUE for a message, any URL credentials masked (also under a mistyped key)."""
    if value is MISSING:
        return "(not set)"
    if isinstance(value, str) and "://" in value:
        return repr(secrets.masked(value))
    if isinstance(value, (list, tuple)):
        return repr([secrets.masked(item) if isinstance(item, str) and "://" in item else item for item in value])
    return repr(value)


def setting_problem(host_name: str, key: str, value: Any, expected: str) -> str:
    if "cred" in key and isinstance(value, dict):  # registry_credentials, or a typo of it: never a password
        value = {registry: f"{str(login).partition(':')[0]}:***" for registry, login in value.items()}
    shown = _shown(value)
    return f"{host_name}: {key} = {shown}: {expected}"


def _located(data: dict[str, Any], place: tuple) -> tuple[str, Any]:
    """The setting's name as written in the inventory (`models[1].revision`) and its value there."""
    name, value = str(place[0]), data.get(place[0], MISSING)
    for part in place[1:]:
        if part == KEY:  # the problem is the mapping key itself
            value = place[-2]
            break
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = MISSING
    return name, value


def validate_settings(host_name: str, data: dict[str, Any]) -> tuple[HostConfig | None, list[str]]:
    theirs = pyinfra_keys()
    ours = {key: value for key, value in data.items() if key not in theirs}
    try:
        config = HostConfig(**ours)
    except SettingsError as error:
        problems = []
        for problem in error.problems:
            key, value = _located(ours, problem.place)
            if problem.kind == "unknown":
                known = [*problem.known, *(sorted(theirs) if len(problem.place) == 1 else [])]
                guess = difflib.get_close_matches(str(problem.place[-1]), known, n=1)
                hint = f" (did you mean {guess[0]!r}?)" if guess else ""
                problems.append(setting_problem(host_name, key, value, f"unknown setting{hint}"))
            elif problem.kind == "missing":
                problems.append(setting_problem(host_name, key, MISSING, REQUIRED.get(key, "a value is required "
                                                                                 "(see docs/settings.md)")))
            else:
                problems.append(setting_problem(host_name, key, value, problem.expected))
        return None, problems
    return config, _cross_checks(host_name, config)


def _cross_checks(host_name: str, config: HostConfig) -> list[str]:
    problems = []
    seen_models: dict[tuple[str, str], int] = {}
    for index, model in enumerate(config.models):
        key = (model.repo_type, model.repo_id)
        if key in seen_models:
            problems.append(setting_problem(host_name, f"models[{index}].repo_id", model.repo_id,
                                     f"each repo once (it is also models[{seen_models[key]}])"))
        seen_models.setdefault(key, index)
    seen: dict[str, str] = {}
    for spec in config.directories():
        if spec.path in seen:
            problems.append(setting_problem(host_name, spec.setting, spec.path,
                                     f"a path of its own (it is also {seen[spec.path]})"))
        seen[spec.path] = spec.setting
    problems += _placement_problems(host_name, config)
    problems += _nesting_problems(host_name, config)
    problems += _ownership_problems(host_name, config)
    problems += _endpoint_problems(host_name, config, os.environ)
    problems += _builder_problems(host_name, config, os.environ)
    return problems


def _endpoint_problems(host_name: str, config: HostConfig, environ) -> list[str]:
    """hf_endpoint '' is $HF_ENDPOINT from ENVIRON: it is held to the setting's own rules; and an endpoint with
    credentials stays on the control node."""
    endpoint = config.hf_endpoint or environ.get("HF_ENDPOINT", "")
    if not config.hf_endpoint and endpoint:
        try:
            _endpoint(endpoint)
        except ValueError as error:
            return [setting_problem(host_name, "hf_endpoint", "", f"{error} ('' is $HF_ENDPOINT, which is "
                                    f"{secrets.masked(endpoint)!r})")]
    if config.model_mode == "host" and endpoint and secrets.has_credentials(endpoint):
        where = "" if config.hf_endpoint else " ('' is $HF_ENDPOINT, which has them)"
        return [setting_problem(host_name, "hf_endpoint", config.hf_endpoint,
                                "model_mode 'host' sends the endpoint to every host; an endpoint with credentials "
                                f"needs model_mode 'control'{where}")]
    return []


def _builder_problems(host_name: str, config: HostConfig, environ) -> list[str]:
    """The builder gets the index credentials (in pip's config), the registry logins and whatever a build reads
    of stack_secrets: never over plain tcp://, where anyone on the path reads them. An explicit tcp:// builder
    is always plain (the deploy gives it no TLS settings); '' is $DOCKER_HOST, with TLS where ENVIRON sets
    DOCKER_TLS_VERIFY (as docker and compose read it)."""
    engine = config.ml_env_builder or environ.get("DOCKER_HOST", "")
    tls = not config.ml_env_builder and bool(environ.get("DOCKER_TLS_VERIFY"))
    given = [name for name, value in (
        ("index credentials", any(secrets.has_credentials(url) for url in
                                  (config.pip_index_url, *config.pip_extra_index_urls, *config.pip_find_links))),
        ("registry_credentials", config.registry_credentials), ("stack_secrets", config.stack_secrets)) if value]
    if not engine.startswith("tcp://") or tls or not given:
        return []
    where = "" if config.ml_env_builder else f" ('' is $DOCKER_HOST, {engine!r}, without DOCKER_TLS_VERIFY)"
    return [setting_problem(host_name, "ml_env_builder", config.ml_env_builder,
                            f"an engine reached by ssh:// or TLS while {' and '.join(given)} are configured: a "
                            f"plain tcp:// engine gets them in clear{where}; use 'ssh://root@<builder>', or '' "
                            "with DOCKER_HOST=tcp://<builder>:2376 and DOCKER_TLS_VERIFY=1 (and DOCKER_CERT_PATH)")]


def _ownership_problems(host_name: str, config: HostConfig) -> list[str]:
    """Root works only where root alone can write, or as the directory's non-root owner (tasks/host/transfer.py
    `as_owner`); so no directory is writable by every user, none is root's yet writable by another group, and the
    directories root itself must trust (the compose project docker compose reads, a stack_root holding the
    others) belong to root."""
    problems = []
    holders = {spec.setting for spec in config.directories()
               if any(other.setting != spec.setting and is_within(other.path, spec.path)
                      for other in config.directories())}
    for spec in config.directories():
        if spec.mode & 0o002:
            problems.append(setting_problem(host_name, f"{spec.setting}_mode", f"{spec.mode:04o}",
                                     "a mode without write for others (every local user could plant links there)"))
        elif spec.setting == "compose_project_dir" and spec.uid != 0:
            problems.append(setting_problem(host_name, f"{spec.setting}_uid", spec.uid,
                                     "0: docker compose runs as root and reads this directory, so its owner decides "
                                     "what root runs (let a group read it with compose_project_dir_gid and mode 0750)"))
        elif spec.setting in holders and spec.uid != 0:
            problems.append(setting_problem(host_name, f"{spec.setting}_uid", spec.uid,
                                     f"0: {spec.setting} holds other configured directories, which a non-root owner "
                                     "could replace with links"))
        elif spec.uid == 0 and spec.gid != 0 and spec.mode & 0o020:
            problems.append(setting_problem(host_name, f"{spec.setting}_mode", f"{spec.mode:04o}",
                                     f"a mode without group write while {spec.setting}_uid is 0: root works there and "
                                     f"group {spec.gid} could plant links (or make a non-root user its owner: "
                                     "the deploy then works there as that user)"))
    return problems


def _placement_problems(host_name: str, config: HostConfig) -> list[str]:
    """Each directory lies below ALLOWED_TREES, or below a directory `allow_paths_outside` names."""
    allowed = (*ALLOWED_TREES, *config.allow_paths_outside)
    trees = f"{', '.join(ALLOWED_TREES[:-1])} or {ALLOWED_TREES[-1]}"
    return [setting_problem(host_name, spec.setting, spec.path,
                            f"a directory below {trees}, or below one named in allow_paths_outside (the deploy "
                            "chowns it and the parents it creates; to confirm that it may, name it or a directory "
                            f"above it: allow_paths_outside=['{spec.path}'])")
            for spec in config.directories() if not any(is_within(spec.path, tree) for tree in allowed)]


def _nesting_problems(host_name: str, config: HostConfig) -> list[str]:
    """ml_env_dir, model_cache_dir and compose_project_dir may lie below stack_root, never inside one another
    (each has its own owner, mode and cleanup); stack_root lies inside none of them."""
    problems = []
    own = [spec for spec in config.directories() if spec.setting != "stack_root"]
    for spec in config.directories():
        for other in own:
            if other.setting != spec.setting and spec.path != other.path and is_within(spec.path, other.path):
                problems.append(setting_problem(host_name, spec.setting, spec.path,
                                         f"a directory outside {other.setting} ({other.path}), which has its own "
                                         "owner, mode and cleanup"))
    return problems
