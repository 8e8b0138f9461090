"""A catalogue of bad inventory data, each value given as `--data KEY=VALUE` and read by pyinfra's own
command-line parsing, then validated: each is refused with its exact message. (That a refused value
touches no host is shown once, on a real fleet: tests/integration/test_hostile_input.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
HOST = "gpu-01.example.internal"
GOOD = "ssh_port=22"  # pyinfra's own key: the example with it alone is valid

BAD = [
    ("ml_env_dir=srv/x", "ml_env_dir = 'srv/x': expected an absolute path such as '/srv/mlstack'"),
    ("stack_root_uid=-1", "stack_root_uid = -1: expected an integer id from 0 to 4294967294"),
    ("model_cache_dir_mode=0o755", "model_cache_dir_mode = '0o755': expected an octal mode such as '0755'"),
    ("ml_env_dri=/x", "ml_env_dri = '/x': unknown setting (did you mean 'ml_env_dir'?)"),
    ("compose_project_dir=/srv/mlstack/ml-env",
     "compose_project_dir = '/srv/mlstack/ml-env': a path of its own (it is also ml_env_dir)"),
    ("ml_env_dir=/var/spool/cron/env",
     "ml_env_dir = '/var/spool/cron/env': expected a directory outside /var/spool (a system location: the deploy "
     "would chown it)"),
    ("ml_env_dir=/home/ops/.ssh/env", "ml_env_dir = '/home/ops/.ssh/env': expected a path without a .ssh directory"),
    ("compose_project_dir=/home/ops/compose",
     "compose_project_dir = '/home/ops/compose': a directory below /srv, /opt, /data, /mnt or /var/lib/mlstack, or "
     "below one named in allow_paths_outside (the deploy chowns it and the parents it creates; to confirm that it "
     "may, name it or a directory above it: allow_paths_outside=['/home/ops/compose'])"),
    ("allow_paths_outside=/home", "allow_paths_outside = '/home': expected a directory of its own, such as "
                                  "'/home/mlstack', not /home itself (the deploy would chown it)"),
    ('models=[{"repo_id": "../etc/passwd"}]',
     "models[0].repo_id = '../etc/passwd': expected a HuggingFace repo id such as"
     " 'sentence-transformers/all-MiniLM-L6-v2'"),
    ('models=[{"repo_id": "a/b", "revision": "main branch"}]',
     "models[0].revision = 'main branch': expected a branch, tag or full commit sha"),
    ('models=[{"repo_id": "a/b"}, {"repo_id": "a/b"}]',
     "models[1].repo_id = 'a/b': each repo once (it is also models[0])"),
    ('service_models={"RERANKING_MODEL": "Qwen/Qwen3-Reranker-4B"}',
     "service_models.RERANKING_MODEL = 'Qwen/Qwen3-Reranker-4B': a repo_id from models"),
    ("ml_env_id=env-123", "ml_env_id = 'env-123': expected an env id such as 'env-0123456789abcdef'"),
    ("keep_envs=-1", "keep_envs = -1: expected a number of previous envs to keep, from 0 to 20"),
    ("health_timeout=0", "health_timeout = 0: expected seconds from 5 to 3600"),
    ("rollout_batch=0%", "rollout_batch = '0%': expected a batch size"),
    ("pip_index_url=pypi.corp/simple", "pip_index_url = 'pypi.corp/simple': expected an http(s):// or file:// URL"),
    ("ml_env_builder=tcp://10.0.0.5:2375", "ml_env_builder = 'tcp://10.0.0.5:2375': an engine reached by ssh:// or "
     "TLS while stack_secrets are configured: a plain tcp:// engine gets them in clear; use 'ssh://root@<builder>'"),
    ("stack=nginx", "stack = 'nginx': expected a compose project directory: an absolute path, one starting with "
                     "./ or ../ (from the directory the deploy runs in), or a name under files/stacks/ "
                     "(archon, reranker)"),
    ("model_mode=everywhere", "model_mode = 'everywhere': expected one of 'control', 'host'"),
    ("fanout=always", "fanout = 'always': expected one of 'auto', 'off'"),
    ("fanout_port=80", "fanout_port = 80: expected a TCP port from 1024 to 65535"),
    ("fanout_min_hosts=1", "fanout_min_hosts = 1: expected a number of hosts, 2 or more"),
    ("fanout_address=gpu-01.example", "fanout_address = 'gpu-01.example': expected an IP address of the host on the "
                                      "fleet's network, such as '10.0.4.21'"),
    ("ml_env_requirements=no-such.txt", "ml_env_requirements = 'no-such.txt': expected a requirements file, but"),
    ('stack_secrets=["MLSTACK_NOT_SET_ANYWHERE"]',
     "stack_secrets = ['MLSTACK_NOT_SET_ANYWHERE']: expected MLSTACK_NOT_SET_ANYWHERE to be set in the control "
     "node's environment (stack_secrets are read from it: export it before the deploy)"),
]

# In a child process: importing pyinfra_cli patches the standard library for gevent, which this one keeps.
VALIDATE = textwrap.dedent("""
    import json, runpy, sys
    from pyinfra_cli.cli import _set_override_data  # what `pyinfra --data` does with its values
    from tasks.validation import validate_host

    hosts, group = runpy.run_path("inventory/example_archon.py")["archon_hosts"]
    (host, data), = hosts
    answers = {}
    for argument in json.load(sys.stdin):
        overrides = _set_override_data([argument], None, None, None, None, None)
        answers[argument] = validate_host(host, {**group, **data, **overrides})[1]
    print(json.dumps(answers))
""")


@pytest.fixture(scope="module")
def problems(archon_secret_values) -> dict[str, list[str]]:
    """`--data ARGUMENT` -> the problems validating the example inventory with it reports."""
    child = subprocess.run([sys.executable, "-c", VALIDATE], cwd=REPO, capture_output=True, text=True, timeout=120,
                           input=json.dumps([GOOD, *(argument for argument, _ in BAD)]),
                           env={**os.environ, **archon_secret_values})
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


@pytest.mark.parametrize(("argument", "message"), BAD, ids=[argument.split("=")[0] for argument, _ in BAD])
def test_bad_data_from_the_command_line_is_refused_with_its_message(problems, argument, message):
    assert any(problem.startswith(f"{HOST}: {message}") for problem in problems[argument]), problems[argument]


def test_the_example_inventory_alone_passes(problems):
    """The base the catalogue starts from is valid: each refusal above is its own value's."""
    assert problems[GOOD] == []
