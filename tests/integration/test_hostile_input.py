"""A catalogue of bad inventory data: each is refused with its exact message before any host changes."""

from __future__ import annotations

import pytest

BAD = [
    ("ml_env_dir=srv/x", "ml_env_dir = 'srv/x': expected an absolute path such as '/srv/mlstack'"),
    ("stack_root_uid=-1", "stack_root_uid = -1: expected an integer id from 0 to 4294967294"),
    ("model_cache_dir_mode=0o755", "model_cache_dir_mode = '0o755': expected an octal mode such as '0755'"),
    ("ml_env_dri=/x", "ml_env_dri = '/x': unknown setting (did you mean 'ml_env_dir'?)"),
    ("compose_project_dir=/srv/mlstack/ml-env",
     "compose_project_dir = '/srv/mlstack/ml-env': a path of its own (it is also ml_env_dir)"),
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
    ("stack=nginx", "stack = 'nginx': expected a compose project directory: an absolute path, one starting with "
                     "./ or ../ (from the directory the deploy runs in), or a name under files/stacks/ "
                     "(archon, reranker)"),
    ("model_mode=everywhere", "model_mode = 'everywhere': expected one of 'control', 'host'"),
    ("ml_env_requirements=no-such.txt", "ml_env_requirements = 'no-such.txt': expected a requirements file, but"),
]


@pytest.fixture(scope="module")
def wiped(fleet):
    fleet.wipe()
    return fleet


@pytest.mark.parametrize(("data", "message"), BAD, ids=[data.split("=")[0] + str(i) for i, (data, _) in enumerate(BAD)])
def test_bad_data_is_refused_with_its_message_and_no_host_changes(wiped, data, message):
    run = wiped.deploy("--data", data)
    assert run.returncode != 0
    for record in wiped.hosts:
        assert f"{record.name}: {message}" in run.output, run.output[-2000:]
        assert wiped.ssh(record, "ls /srv/mlstack 2>&1 || true").strip().endswith("No such file or directory")
    assert "Traceback" not in run.output


def test_an_empty_requirements_file_is_refused(wiped, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    run = wiped.deploy("--data", f"ml_env_requirements={empty}")
    assert run.returncode != 0
    assert "the requirements file names no package: an empty ML env is certainly a mistake" in run.output
    assert all(wiped.ssh(record, "ls /srv/mlstack 2>&1 || true").strip().endswith("No such file or directory")
               for record in wiped.hosts)


def test_a_secret_missing_on_the_control_node_stops_the_deploy_at_plan_time(wiped):
    run = wiped.deploy("--data", 'stack_secrets=["MLSTACK_NOT_SET_ANYWHERE"]')
    assert run.returncode != 0
    assert ("stack_secrets = ['MLSTACK_NOT_SET_ANYWHERE']: expected MLSTACK_NOT_SET_ANYWHERE to be set in the "
            "control node's environment (stack_secrets are read from it: export it before the deploy)") in run.output
    assert all(wiped.ssh(record, "ls /srv/mlstack 2>&1 || true").strip().endswith("No such file or directory")
               for record in wiped.hosts)
    assert "Traceback" not in run.output
