"""Config validation: every bad input gets its own exact message naming host, key, value, expectation."""

import runpy
from pathlib import Path

import pytest

from tasks.config import ConfigError, HostConfig, validate_fleet, validate_host

DEFAULTS = {
    key: value
    for key, value in runpy.run_path(str(Path(__file__).parents[2] / "inventory/group_data/all.py")).items()
    if not key.startswith("_")
}


def problems_for(**overrides):
    config, problems = validate_host("gpu-01", {**DEFAULTS, **overrides})
    return problems


def test_the_defaults_are_valid_and_typed():
    config, problems = validate_host("gpu-01", DEFAULTS)
    assert problems == []
    assert config.ml_env_dir == "/srv/mlstack/ml-env"
    assert config.compose_project_dir_mode == 0o750
    assert [spec.setting for spec in config.directories()] == [
        "stack_root", "ml_env_dir", "model_cache_dir", "compose_project_dir",
    ]


def test_pyinfra_connector_keys_and_global_arguments_are_not_ours_to_reject():
    assert problems_for(ssh_user="ops", ssh_port=2222, ssh_known_hosts_file="/k", _sudo=True, _sudo_user="x") == []


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ml_env_dir", "srv/mlstack/ml-env", "expected an absolute path such as '/srv/mlstack'"),
        ("ml_env_dir", "/srv//mlstack", "expected a normalised path (did you mean '/srv/mlstack'?)"),
        ("ml_env_dir", "/srv/mlstack/", "expected a normalised path (did you mean '/srv/mlstack'?)"),
        ("ml_env_dir", "/srv/mlstack/../etc", "expected a normalised path (did you mean '/srv/etc'?)"),
        ("ml_env_dir", "/srv/./mlstack", "expected a normalised path (did you mean '/srv/mlstack'?)"),
        ("ml_env_dir", "/", "expected a directory below '/', not '/' itself"),
        ("ml_env_dir", 42, "expected an absolute path such as '/srv/mlstack'"),
        ("stack_root_uid", -1, "expected an integer id from 0 to 4294967294"),
        ("stack_root_uid", 4294967295, "expected an integer id from 0 to 4294967294"),
        ("stack_root_gid", "www-data", "expected an integer id from 0 to 4294967294"),
        ("stack_root_gid", 1000.0, "expected an integer id from 0 to 4294967294"),
        ("stack_root_uid", True, "expected an integer id from 0 to 4294967294"),
        ("model_cache_dir_mode", "0o755", "expected an octal mode such as '0755'"),
        ("model_cache_dir_mode", 0o755, "expected an octal mode such as '0755'"),
        ("model_cache_dir_mode", "0789", "expected an octal mode such as '0755'"),
        ("model_cache_dir_mode", "rwxr-xr-x", "expected an octal mode such as '0755'"),
        ("model_cache_dir_mode", "75", "expected an octal mode such as '0755'"),
    ],
)
def test_each_bad_value_has_its_exact_message(key, value, message):
    assert problems_for(**{key: value}) == [f"gpu-01: {key} = {value!r}: {message}"]


@pytest.mark.parametrize(("value", "mode"),
                         [("0755", 0o755), ("755", 0o755), (755, 0o755), ("2775", 0o2775), ("02775", 0o2775)])
def test_modes_are_octal_text_or_pyinfra_style_digits(value, mode):
    config, problems = validate_host("gpu-01", {**DEFAULTS, "ml_env_dir_mode": value})
    assert problems == [] and config.ml_env_dir_mode == mode


def test_numeric_ids_may_come_as_digit_strings_from_the_command_line():
    config, problems = validate_host("gpu-01", {**DEFAULTS, "model_cache_dir_uid": "1000"})
    assert problems == [] and config.model_cache_dir_uid == 1000


def test_a_typo_is_an_unknown_setting_with_a_suggestion():
    assert problems_for(ml_env_dri="/x") == ["gpu-01: ml_env_dri = '/x': unknown setting (did you mean 'ml_env_dir'?)"]
    assert problems_for(colour="blue") == ["gpu-01: colour = 'blue': unknown setting"]


def test_typos_of_pyinfra_keys_are_caught_too():
    assert problems_for(_sduo=True) == ["gpu-01: _sduo = True: unknown setting (did you mean '_sudo'?)"]
    assert problems_for(ssh_usr="ops") == ["gpu-01: ssh_usr = 'ops': unknown setting (did you mean 'ssh_user'?)"]


def test_a_missing_setting_says_where_defaults_live():
    data = dict(DEFAULTS)
    del data["stack_root"]
    _, problems = validate_host("gpu-01", data)
    assert problems == ["gpu-01: stack_root = (not set): a value is required (defaults: inventory/group_data/all.py)"]


def test_two_directories_cannot_share_a_path():
    assert problems_for(model_cache_dir="/srv/mlstack/ml-env") == [
        "gpu-01: model_cache_dir = '/srv/mlstack/ml-env': a path of its own (it is also ml_env_dir)"
    ]


def test_every_problem_on_every_host_is_reported_at_once():
    hosts = [
        ("gpu-01", {**DEFAULTS, "stack_root_uid": -1}),
        ("gpu-02", {**DEFAULTS}),
        ("gpu-03", {**DEFAULTS, "ml_env_dir": "rel", "stack_root_mode": "9"}),
    ]
    with pytest.raises(ConfigError) as caught:
        validate_fleet(hosts)
    assert caught.value.problems == [
        "gpu-01: stack_root_uid = -1: expected an integer id from 0 to 4294967294",
        "gpu-03: stack_root_mode = '9': expected an octal mode such as '0755'",
        "gpu-03: ml_env_dir = 'rel': expected an absolute path such as '/srv/mlstack'",
    ]
    assert str(caught.value).startswith("invalid inventory data, nothing was changed:\n  gpu-01: stack_root_uid")


def test_config_is_immutable():
    config = HostConfig(**DEFAULTS)
    with pytest.raises(Exception):
        config.stack_root = "/elsewhere"


def test_the_example_inventory_is_valid():
    example = runpy.run_path(str(Path(__file__).parents[2] / "inventory/example_gpu_fleet.py"))
    hosts, group_data = example["gpu_hosts"]
    configs = validate_fleet((name, {**DEFAULTS, **group_data, **data}) for name, data in hosts)
    assert configs["gpu-01.example.internal"].stack_root == "/data/mlstack"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ml_env_requirements", "no-such.txt", "expected a requirements file, but {files}/no-such.txt does not exist"),
        ("ml_env_requirements", "", "expected a requirements file: a name in files/ or a path on the control node"),
        ("ml_env_id", "env-123", "expected an env id such as 'env-0123456789abcdef' (as shown by a deploy), or None"),
        ("ml_env_id", "../env-0123456789abcdef",
         "expected an env id such as 'env-0123456789abcdef' (as shown by a deploy), or None"),
        ("keep_envs", -1, "expected a number of previous envs to keep, from 0 to 20"),
        ("keep_envs", "two", "expected a number of previous envs to keep, from 0 to 20"),
        ("ml_env_base_image", "Python 3.11", "expected a docker image reference such as 'python:3.11-slim-bookworm'"),
        ("ml_env_builder", "gpu-01", "expected '' (the control node's docker engine, or DOCKER_HOST) or a docker URL "
                                    "such as 'ssh://root@gpu-01' or 'unix:///run/docker.sock'"),
        ("ml_env_cache_dir", "cache", "expected an absolute path on the control node, or one starting with '~/'"),
        ("pip_index_url", "pypi.corp/simple", "expected an http(s):// or file:// URL"),
        ("pip_trusted_hosts", ["pypi.corp:8443", "bad host"],
         "expected host names such as 'pypi.corp' or 'pypi.corp:8443'"),
    ],
)
def test_each_bad_ml_env_value_has_its_exact_message(key, value, message):
    files = Path(__file__).parents[2] / "files"
    assert problems_for(**{key: value}) == [f"gpu-01: {key} = {value!r}: {message.format(files=files)}"]


def test_an_empty_requirements_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    assert problems_for(ml_env_requirements=str(empty)) == [
        f"gpu-01: ml_env_requirements = {str(empty)!r}: expected a usable requirements file: {empty}: "
        "the requirements file names no package: an empty ML env is certainly a mistake"
    ]


def test_index_credentials_are_masked_in_every_message(monkeypatch):
    monkeypatch.delenv("PIP_TOKEN", raising=False)
    assert problems_for(pip_index_url="https://ci:${PIP_TOKEN}@pypi.corp/simple/") == [
        "gpu-01: pip_index_url = 'https://***@pypi.corp/simple/': "
        "expected ${PIP_TOKEN} to be set in the control node's environment"
    ]
    assert problems_for(pip_extra_index_urls=["https://ci:hunter2@pypi.corp/x", "ftp://y"]) == [
        "gpu-01: pip_extra_index_urls = ['https://***@pypi.corp/x', 'ftp://y']: expected an http(s):// or file:// URL"
    ]
    assert problems_for(pip_index_ur="https://ci:hunter2@pypi.corp/simple/") == [
        "gpu-01: pip_index_ur = 'https://***@pypi.corp/simple/': unknown setting (did you mean 'pip_index_url'?)"
    ]


def test_index_lists_may_come_comma_separated_from_the_command_line(monkeypatch):
    monkeypatch.setenv("PIP_TOKEN", "hunter2")
    config, problems = validate_host("gpu-01", {**DEFAULTS, "pip_trusted_hosts": "a.corp,b.corp:8080",
                                                "pip_index_url": "https://ci:${PIP_TOKEN}@a.corp/simple/"})
    assert problems == [] and config.pip_trusted_hosts == ["a.corp", "b.corp:8080"]
    assert config.pip_options()["index_url"] == "https://ci:${PIP_TOKEN}@a.corp/simple/"  # expanded only for pip


def test_model_entries_get_defaults_and_their_cache_folder():
    config, problems = validate_host("gpu-01", {**DEFAULTS, "models": [
        {"repo_id": "sentence-transformers/all-MiniLM-L6-v2"},
        {"repo_id": "org/data", "repo_type": "dataset", "revision": "v1.0", "allow_patterns": "*.json"},
    ], "service_models": {"RERANKING_MODEL": "sentence-transformers/all-MiniLM-L6-v2"}})
    assert problems == []
    first, second = config.models
    assert ((first.revision, first.repo_type, first.folder)
            == ("main", "model", "models--sentence-transformers--all-MiniLM-L6-v2"))
    assert (second.folder, second.allow_patterns) == ("datasets--org--data", ["*.json"])


@pytest.mark.parametrize(
    ("models", "problem"),
    [
        ([{"repo_id": "../etc/passwd"}], "models[0].repo_id = '../etc/passwd': expected a HuggingFace repo id such as "
                                         "'sentence-transformers/all-MiniLM-L6-v2'"),
        ([{"repo_id": "a/b", "revision": "main branch"}], "models[0].revision = 'main branch': expected a branch, tag "
                                                          "or full commit sha such as 'main', 'v1.0' or 40 hex digits"),
        ([{"repo_id": "a/b", "revision": "../../x"}], "models[0].revision = '../../x': expected a branch, tag or full "
                                                      "commit sha such as 'main', 'v1.0' or 40 hex digits"),
        ([{"repo_id": "a/b", "repo_type": "space"}],
         "models[0].repo_type = 'space': expected one of 'model', 'dataset'"),
        ([{"repo_id": "a/b", "revison": "v1"}], "models[0].revison = 'v1': unknown setting (did you mean 'revision'?)"),
        ([{"revision": "v1"}], "models[0].repo_id = (not set): a value is required (see the README's models table)"),
        ([{"repo_id": "a/b"}, {"repo_id": "a/b", "revision": "v2"}], "models[1].repo_id = 'a/b': each repo once "
                                                                     "(it is also models[0])"),
        ([{"repo_id": "a/b", "ignore_patterns": []}], "models[0].ignore_patterns = []: expected None or a list of glob "
                                                      "patterns such as ['*.json', '*.safetensors']"),
    ],
)
def test_each_bad_model_entry_has_its_exact_message(models, problem):
    assert problems_for(models=models, service_models={"RERANKING_MODEL": "a/b"}) == [f"gpu-01: {problem}"]


def test_a_service_naming_a_model_the_deploy_does_not_place_is_refused():
    assert problems_for(models=[{"repo_id": "Qwen/Qwen3-Reranker-0.6B"}],
                        service_models={"RERANKING_MODEL": "Qwen/Qwen3-Reranker-4B"}) == [
        "gpu-01: service_models.RERANKING_MODEL = 'Qwen/Qwen3-Reranker-4B': a repo_id from models "
        "(the stack must use a model the deploy places: Qwen/Qwen3-Reranker-0.6B)"
    ]
    assert problems_for(service_models={"reranking model": "Qwen/Qwen3-Reranker-0.6B"})[0].startswith(
        "gpu-01: service_models.reranking model = 'reranking model': expected an environment variable name")


def test_a_stack_service_reading_a_model_setting_the_inventory_lacks_is_refused():
    assert problems_for(stack="reranker", service_models={}) == [
        "gpu-01: service_models = {}: an entry for RERANKING_MODEL (stack 'reranker': read by reranker)"
    ]
