"""The env build's pip (files/pip_install.py, run by files/env_build.sh): pip reads the config that holds the
index settings and their credentials; the sdist builds it runs do not. Real pip, and a real sdist whose build
backend records what it can see."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

FILES = Path(__file__).parents[3] / "files"
SECRET = "idx-pw-5d1c"

PYPROJECT = """\
[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]
"""

# The in-tree build backend: each hook appends what it sees to $SEEN, then a wheel is made.
BACKEND = '''\
import base64, hashlib, json, os, zipfile


def _record(hook):
    named = os.environ.get("PIP_CONFIG_FILE")
    read = []
    for path in (named, os.environ["CONFIG_WAS"]):
        try:
            with open(path) as config:
                read.append(config.read())
        except (OSError, TypeError):
            pass
    with open(os.environ["SEEN"], "a") as seen:
        seen.write(json.dumps({"hook": hook, "PIP_CONFIG_FILE": named, "read": read,
                               "environment": dict(os.environ)}) + "\\n")


def get_requires_for_build_wheel(config_settings=None):
    _record("get_requires_for_build_wheel")
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _record("build_wheel")
    files = {"probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\\nName: probe\\nVersion: 1.0\\n",
             "probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}
    files["probe-1.0.dist-info/RECORD"] = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
        f"{len(text.encode())}\\n" for name, text in files.items()) + "probe-1.0.dist-info/RECORD,,\\n"
    name = "probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
    return name
'''


def make_sdist(links: Path) -> None:
    source = links.parent / "probe-1.0"
    source.mkdir()
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "backend.py").write_text(BACKEND)
    (source / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: probe\nVersion: 1.0\n")
    links.mkdir()
    with tarfile.open(links / "probe-1.0.tar.gz", "w:gz") as sdist:
        sdist.add(source, arcname="probe-1.0")


def test_pip_reads_its_config_and_the_sdist_builds_it_runs_see_neither_it_nor_its_name(tmp_path):
    links, seen, config = tmp_path / "links", tmp_path / "seen.jsonl", tmp_path / "pip.conf"
    make_sdist(links)
    # The sdist is found only through the config's find-links (no index): pip read it.
    config.write_text(f"[global]\nno-index = true\nfind-links = {links}\n"
                      f"index-url = http://ci:{SECRET}@127.0.0.1:9/simple\n")
    result = subprocess.run(
        [sys.executable, str(FILES / "pip_install.py"), str(config), "install", "--no-cache-dir",
         "--target", str(tmp_path / "target"), "probe==1.0"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
             "SEEN": str(seen), "CONFIG_WAS": str(config)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "target/probe-1.0.dist-info/METADATA").exists()
    hooks = [json.loads(line) for line in seen.read_text().splitlines()]
    assert [hook["hook"] for hook in hooks] == ["get_requires_for_build_wheel", "build_wheel"]
    for hook in hooks:
        assert hook["PIP_CONFIG_FILE"] is None and hook["read"] == []
        assert SECRET not in json.dumps(hook["environment"])
    assert not config.exists()  # removed once pip had it open
