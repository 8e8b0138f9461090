"""Settings validation: every bad input gets its own exact message naming host, key, value, expectation.

No docker needed: the compose project against the settings is tests/unit/control/test_project_checks.py."""

import runpy
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from tasks import secrets
from tasks.config import HostConfig, validate_settings
from tasks.control import hub

EXAMPLE = runpy.run_path(str(Path(__file__).parents[2] / "inventory/example_archon.py"))["archon_hosts"][1]
DEFAULTS = {key: value for key, value in EXAMPLE.items() if not key.startswith(("_", "ssh_"))}  # no connection data


def problems_for(**overrides):
    config, problems = validate_settings("gpu-01", {**DEFAULTS, **overrides})
    return problems


def test_the_defaults_are_valid_and_typed():
    config, problems = validate_settings("gpu-01", DEFAULTS)
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
    config, problems = validate_settings("gpu-01", {**DEFAULTS, "ml_env_dir_mode": value})
    assert problems == [] and config.ml_env_dir_mode == mode


def test_numeric_ids_may_come_as_digit_strings_from_the_command_line():
    config, problems = validate_settings("gpu-01", {**DEFAULTS, "model_cache_dir_uid": "1000"})
    assert problems == [] and config.model_cache_dir_uid == 1000


def test_a_typo_is_an_unknown_setting_with_a_suggestion():
    assert problems_for(ml_env_dri="/x") == ["gpu-01: ml_env_dri = '/x': unknown setting (did you mean 'ml_env_dir'?)"]
    assert problems_for(colour="blue") == ["gpu-01: colour = 'blue': unknown setting"]


def test_typos_of_pyinfra_keys_are_caught_too():
    assert problems_for(_sduo=True) == ["gpu-01: _sduo = True: unknown setting (did you mean '_sudo'?)"]
    assert problems_for(ssh_usr="ops") == ["gpu-01: ssh_usr = 'ops': unknown setting (did you mean 'ssh_user'?)"]


def test_unset_settings_take_their_defaults_from_the_code_and_stack_alone_is_required():
    config, problems = validate_settings("gpu-01", {"stack": "reranker"})
    assert problems == []
    assert (config.stack_root, config.models, config.ml_services, config.service_gpus, config.http_checks,
            config.stack_secrets) == ("/srv/mlstack", [], {}, {}, [], [])
    _, problems = validate_settings("gpu-01", {})
    assert problems == ["gpu-01: stack = (not set): a value is required: your compose project's directory on the "
                        "control node (e.g. stack = \"./compose\" in the inventory, from the directory you run in, or "
                        "--data stack=/path)"]


def test_a_relative_stack_is_read_from_the_directory_the_deploy_runs_in(tmp_path, monkeypatch):
    (tmp_path / "team/compose").mkdir(parents=True)
    (tmp_path / "team/compose/compose.yaml").write_text("services:\n  web: {image: nginx}\n")
    monkeypatch.chdir(tmp_path / "team")
    config, problems = validate_settings("gpu-01", {"stack": "./compose"})
    assert problems == [] and config.stack == str(tmp_path / "team/compose")
    assert validate_settings("gpu-01", {"stack": "compose"})[1][0].startswith(  # a bare name is a shipped project
        "gpu-01: stack = 'compose': expected a compose project directory: an absolute path, one starting with ./")


def test_a_stack_secret_must_be_set_before_anything_is_built(monkeypatch):
    monkeypatch.delenv("SUPABASE_SERVICE_KEY")
    assert problems_for() == [
        "gpu-01: stack_secrets = ['SUPABASE_URL', 'SUPABASE_SERVICE_KEY']: expected SUPABASE_SERVICE_KEY to be set "
        "in the control node's environment (stack_secrets are read from it: export it before the deploy)"]


def test_two_directories_cannot_share_a_path():
    assert problems_for(model_cache_dir="/srv/mlstack/ml-env") == [
        "gpu-01: model_cache_dir = '/srv/mlstack/ml-env': a path of its own (it is also ml_env_dir)"
    ]


def test_config_is_immutable():
    config = HostConfig(**DEFAULTS)
    with pytest.raises(FrozenInstanceError, match="frozen"):
        config.stack_root = "/elsewhere"
    assert config.stack_root == "/srv/mlstack"


def test_the_settings_text_a_release_is_recorded_by_is_unchanged():
    """releases.settings_digest hashes this text: each fragment is what pydantic's model_dump_json wrote before
    the settings were checked without it, so an upgrade leaves every host's recorded settings digest as it was."""
    config = HostConfig(
        stack="reranker", compose_files=["compose.yaml"], stack_profiles="a,b",
        stack_env={"A": 1, "B": "ü\"\\\t\x01\x7f"}, service_gpus={"reranker": [0, 1], "docs": "all", "b": "2"},
        ml_services={"reranker": {"ml_env": "false", "models": ["RERANKING_MODEL"]}}, stack_root_mode="2775",
        models=[{"repo_id": "org/m", "revision": "a" * 40, "allow_patterns": ["*.json", "é"]},
                {"repo_id": "org/d", "repo_type": "dataset", "ignore_patterns": "x\n\u2028"}],
        service_models={"RERANKING_MODEL": "org/m"}, rollout_batch=5)
    text = config.dump_json()
    assert text.startswith('{"stack":"reranker","compose_files":["compose.yaml"],"stack_profiles":["a","b"],'
                           '"stack_env":{"A":"1","B":"ü\\"\\\\\\t\\u0001\x7f"},"stack_secrets":[],'
                           '"ml_services":{"reranker":{"ml_env":false,"models":["RERANKING_MODEL"]}},'
                           '"service_gpus":{"reranker":[0,1],"docs":"all","b":2},"http_checks":[],')
    assert ('"stack_root":"/srv/mlstack","stack_root_uid":0,"stack_root_gid":0,"stack_root_mode":1533,' in text
            and '"ml_env_id":null,"keep_envs":2,"ml_env_check_active":false,' in text)
    assert ('"models":[{"repo_id":"org/m","revision":"' + "a" * 40 + '","repo_type":"model","allow_patterns":'
            '["*.json","é"],"ignore_patterns":null},{"repo_id":"org/d","revision":"main","repo_type":"dataset",'
            '"allow_patterns":null,"ignore_patterns":["x\\n\u2028"]}],"service_models":{"RERANKING_MODEL":"org/m"},'
            in text)
    assert text.endswith('"rollout_canary":1,"rollout_batch":"5","rollout_max_failures":0}')


def test_every_problem_of_an_entry_is_named_by_its_place():
    problems = problems_for(
        models=[{"repo_id": "a/b", "revison": "v1"}, "a/c"],
        ml_services={"archon-server": {"modles": [], "ml_env": "yes"}, 7: {}},
        service_models={"reranking model": 3})
    assert problems == [
        "gpu-01: ml_services[7] = 7: expected a service name",
        "gpu-01: ml_services.archon-server.ml_env = 'yes': expected True or False",
        "gpu-01: ml_services.archon-server.modles = []: unknown setting (did you mean 'models'?)",
        "gpu-01: models[0].revison = 'v1': unknown setting (did you mean 'revision'?)",
        "gpu-01: models[1] = 'a/c': expected a mapping of repo_id, revision, repo_type, allow_patterns, "
        "ignore_patterns",
        "gpu-01: service_models.reranking model = 'reranking model': expected an environment variable name such as "
        "'RERANKING_MODEL'",
        "gpu-01: service_models.reranking model = 3: expected a repo_id of models"]


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
    config, problems = validate_settings("gpu-01", {**DEFAULTS, "pip_trusted_hosts": "a.corp,b.corp:8080",
                                                "pip_index_url": "https://ci:${PIP_TOKEN}@a.corp/simple/"})
    assert problems == [] and config.pip_trusted_hosts == ["a.corp", "b.corp:8080"]
    assert config.pip_options()["index_url"] == "https://ci:${PIP_TOKEN}@a.corp/simple/"  # expanded only for pip


def test_model_entries_get_defaults_and_their_cache_folder():
    config, problems = validate_settings("gpu-01", {**DEFAULTS, "models": [
        {"repo_id": "sentence-transformers/all-MiniLM-L6-v2"},
        {"repo_id": "org/data", "repo_type": "dataset", "revision": "v1.0", "allow_patterns": "*.json"},
    ], "service_models": {"RERANKING_MODEL": "sentence-transformers/all-MiniLM-L6-v2"}})
    assert problems == []
    first, second = config.models
    assert ((first.revision, first.repo_type, first.folder)
            == ("main", "model", "models--sentence-transformers--all-MiniLM-L6-v2"))
    assert (second.folder, second.allow_patterns) == ("datasets--org--data", ("*.json",))


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
        ([{"revision": "v1"}], "models[0].repo_id = (not set): a value is required (see docs/settings.md)"),
        ([{"repo_id": "a/b"}, {"repo_id": "a/b", "revision": "v2"}], "models[1].repo_id = 'a/b': each repo once "
                                                                     "(it is also models[0])"),
        ([{"repo_id": "a/b", "ignore_patterns": []}], "models[0].ignore_patterns = []: expected None or a list of glob "
                                                      "patterns such as ['*.json', '*.safetensors']"),
    ],
)
def test_each_bad_model_entry_has_its_exact_message(models, problem):
    assert problems_for(models=models, service_models={"RERANKING_MODEL": "a/b"}) == [f"gpu-01: {problem}"]


@pytest.mark.parametrize("files", [["../x.yml"], ["/etc/compose.yml"], ["a:b.yml"], ["a b.yml"]])
def test_compose_files_are_plain_names_inside_the_project(files):
    (problem,) = problems_for(compose_files=files)
    assert problem.startswith("gpu-01: compose_files = ") and "relative to the project directory" in problem


# Configured host directories: characters, system locations, nesting.

@pytest.mark.parametrize(("value", "shown", "breaks"), [
    ("/srv/ml:env", "':'", "docker -v"),
    ("/srv/ml,env", "','", "docker --mount"),
    ("/srv/ml$env", "'$'", "compose"),
    ("/srv/ml#1", "'#'", "a .env line"),
    ("/srv/ml env", "' '", "a shell word or a .env line"),
    ("/srv/ml\nenv", "'\\n'", "a shell word or a .env line"),
    ("/srv/ml\0env", "'\\x00'", "a shell word or a .env line"),
    ("/srv/ml'env", '"\'"', "a shell word or a .env line"),
    ('/srv/ml"env', "'\"'", "a shell word or a .env line"),
    ("/srv/ml\\env", "'\\\\'", "a shell word or a .env line"),
    ("/srv/ml*", "'*'", "a shell word or a .env line"),
    ("/srv/ml\u00e9", "'\u00e9'", "a shell word or a .env line"),
])
def test_a_directory_with_a_character_that_breaks_docker_compose_env_or_shell_is_refused(value, shown, breaks):
    assert problems_for(ml_env_dir=value) == [
        f"gpu-01: ml_env_dir = {value!r}: expected a path of letters, digits and . _ - + @ / only "
        f"({shown} would break {breaks})"
    ]


def test_a_directory_of_letters_digits_and_dot_underscore_dash_plus_at_passes():
    assert problems_for(ml_env_dir="/srv/ML-env_1.2+x@y") == []


SYSTEM = ["/etc", "/proc", "/sys", "/dev", "/boot", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
          "/root", "/run", "/var/run", "/var/lib/docker", "/var/lib/containerd", "/var/lib/dpkg", "/var/lib/apt",
          "/var/log", "/snap", "/lost+found", "/var/spool", "/var/lib/sudo", "/var/lib/systemd", "/var/mail",
          "/var/backups"]


@pytest.mark.parametrize("tree", SYSTEM)
@pytest.mark.parametrize("below", ["", "/mlstack"])
def test_a_directory_in_a_system_location_is_refused(tree, below):
    for key in ("stack_root", "model_cache_dir"):
        value = tree + below
        assert f"gpu-01: {key} = {value!r}: expected a directory outside {tree} (a system location: the deploy " \
               "would chown it)" in problems_for(**{key: value})


@pytest.mark.parametrize("tree", ["/tmp", "/var/tmp", "/dev/shm"])
def test_a_directory_in_a_world_writable_temp_dir_is_refused(tree):
    assert problems_for(compose_project_dir=f"{tree}/compose") == [
        f"gpu-01: compose_project_dir = '{tree}/compose': expected a directory outside {tree} (world-writable: "
        "a local user could plant the path first)"
    ]


@pytest.mark.parametrize("parent", ["/home", "/var", "/var/lib", "/srv", "/opt", "/data", "/mnt", "/media"])
def test_a_shared_parent_may_hold_the_directories_but_not_be_one(parent):
    assert problems_for(ml_env_dir=parent) == [
        f"gpu-01: ml_env_dir = {parent!r}: expected a directory of its own, such as '{parent}/mlstack', "
        f"not {parent} itself (the deploy would chown it)"
    ]
    assert problems_for(ml_env_dir=f"{parent}/ml-env", allow_paths_outside=[f"{parent}/ml-env"]) == []


@pytest.mark.parametrize("value", ["/etcetera", "/usr-local-data/x", "/tmpfs/x", "/var/lib/docker-data",
                                   "/var/logs", "/runner/x", "/home/ops/mlstack", "/data/etc", "/srv/root",
                                   "/var/spooler/x", "/home/ops/ssh", "/home/ops/x.ssh"])
def test_neighbours_of_system_locations_pass_once_confirmed(value):
    assert problems_for(ml_env_dir=value, allow_paths_outside=[value]) == []


def outside(key: str, value: str) -> str:
    return (f"gpu-01: {key} = {value!r}: a directory below /srv, /opt, /data, /mnt or /var/lib/mlstack, or below "
            "one named in allow_paths_outside (the deploy chowns it and the parents it creates; to confirm that it "
            f"may, name it or a directory above it: allow_paths_outside=[{value!r}])")


@pytest.mark.parametrize("value", ["/srv/x", "/opt/x", "/data/x", "/mnt/x", "/var/lib/mlstack",
                                   "/var/lib/mlstack/env"])
def test_directories_below_the_allowed_places_need_no_confirmation(value):
    assert problems_for(ml_env_dir=value) == []


@pytest.mark.parametrize("value", ["/home/ops/mlstack", "/var/lib/mlstack2/env", "/var/lib/other/env", "/media/usb/env",
                                   "/usr-local-data/env", "/var/cache/env", "/nfs/env"])
def test_a_directory_outside_the_allowed_places_is_refused_until_confirmed(value):
    assert problems_for(ml_env_dir=value) == [outside("ml_env_dir", value)]
    assert problems_for(ml_env_dir=value, allow_paths_outside=[value.rsplit("/", 1)[0] + "-x"]) == [
        outside("ml_env_dir", value)]  # a name that merely starts like it confirms nothing
    assert problems_for(ml_env_dir=value, allow_paths_outside=[value]) == []
    assert problems_for(ml_env_dir=value, allow_paths_outside=f"/x/y,{value.rsplit('/', 1)[0]}") == []  # --data


def test_each_directory_outside_is_named_and_one_confirmation_covers_a_tree():
    tree = {"stack_root": "/home/ml/stack", "ml_env_dir": "/home/ml/stack/env", "model_cache_dir": "/srv/cache",
            "compose_project_dir": "/home/ml/compose"}
    assert problems_for(**tree) == [outside(key, tree[key]) for key in ("stack_root", "ml_env_dir",
                                                                        "compose_project_dir")]
    assert problems_for(**tree, allow_paths_outside=["/home/ml"]) == []


@pytest.mark.parametrize("place", ["/var/spool/cron/crontabs", "/var/lib/sudo/lectured", "/home/ops/.ssh",
                                   "/home/ops/.ssh/env", "/var/lib/systemd/env", "/var/mail/env", "/var/backups/env",
                                   "/etc/env"])
def test_system_places_stay_refused_even_when_confirmed(place):
    problems = problems_for(ml_env_dir=place, allow_paths_outside=[place])
    assert len(problems) == 2 and all("expected a directory outside" in problem or ".ssh directory" in problem
                                      for problem in problems), problems
    assert [problem.split(" = ")[0] for problem in problems] == ["gpu-01: ml_env_dir", "gpu-01: allow_paths_outside"]


@pytest.mark.parametrize(("value", "message"), [
    ("/home", "expected a directory of its own, such as '/home/mlstack', not /home itself (the deploy would chown it)"),
    ("home/ml", "expected an absolute path such as '/srv/mlstack'"),
    ("/", "expected a directory below '/', not '/' itself"),
    ("/tmp/ml", "expected a directory outside /tmp (world-writable: a local user could plant the path first)"),
])
def test_each_confirmation_is_checked_like_a_directory(value, message):
    assert problems_for(allow_paths_outside=[value]) == [f"gpu-01: allow_paths_outside = [{value!r}]: {message}"]


def test_directories_may_lie_below_stack_root_but_not_inside_one_another():
    assert problems_for(model_cache_dir="/srv/mlstack/ml-env/cache") == [
        "gpu-01: model_cache_dir = '/srv/mlstack/ml-env/cache': a directory outside ml_env_dir (/srv/mlstack/ml-env), "
        "which has its own owner, mode and cleanup"
    ]
    assert problems_for(ml_env_dir="/srv/mlstack/compose/env") == [
        "gpu-01: ml_env_dir = '/srv/mlstack/compose/env': a directory outside compose_project_dir "
        "(/srv/mlstack/compose), which has its own owner, mode and cleanup"
    ]
    assert problems_for(stack_root="/srv/mlstack/hf-cache/root") == [
        "gpu-01: stack_root = '/srv/mlstack/hf-cache/root': a directory outside model_cache_dir "
        "(/srv/mlstack/hf-cache), which has its own owner, mode and cleanup"
    ]
    # a name that merely starts like a sibling is not inside it; stack_root may be anywhere else
    assert problems_for(model_cache_dir="/srv/mlstack/ml-env2", stack_root="/srv/elsewhere") == []


# Repo ids and revisions: what huggingface_hub refuses is refused here first.

REPO_MESSAGE = "expected a HuggingFace repo id such as 'sentence-transformers/all-MiniLM-L6-v2'"
REVISION_MESSAGE = "expected a branch, tag or full commit sha such as 'main', 'v1.0' or 40 hex digits"


def model_problems(**entry):
    return problems_for(models=[{"repo_id": "a/b", **entry}], service_models={"RERANKING_MODEL": entry.get(
        "repo_id", "a/b")})


@pytest.mark.parametrize("repo_id", [
    "a--b", "org/a--b", "a..b", "org/a..b", "-a", "a-", ".a", "a.", "org/-a", "org/a.", "-org/a", "org./a",
    "a" * 97, "org/" + "a" * 97, "o" * 97 + "/a", "a/b/c", "datasets/org/x", "a.git", "org/a.git", "", "/a", "a/",
    "a b", "caf\u00e9", "\u6587\u4ef6", "a/b\n", "a\\b", "a$b",
])
def test_repo_ids_huggingface_hub_refuses_are_refused(repo_id):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    with pytest.raises(HFValidationError):
        validate_repo_id(repo_id)
    assert model_problems(repo_id=repo_id) == [f"gpu-01: models[0].repo_id = {repo_id!r}: {REPO_MESSAGE}"]


@pytest.mark.parametrize("repo_id", ["a", "a/b", "Org-1/Model_2.0", "a_", "org_/x_", "a" * 96,
                                     "o" * 96 + "/" + "a" * 96, "a-b.c_d/e-f.g"])
def test_repo_ids_huggingface_hub_takes_pass(repo_id):
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    assert model_problems(repo_id=repo_id) == []


@pytest.mark.parametrize("revision", [".", "..", "a/.", "./a", "a/./b", "a/..", "v1..2", "-main", "--upload-pack=x",
                                      "x" * 256, "a//b", "/a", "a/", "main branch", "v\u00e9", ""])
def test_revisions_that_could_climb_a_path_or_read_as_an_option_are_refused(revision):
    assert model_problems(revision=revision) == [f"gpu-01: models[0].revision = {revision!r}: {REVISION_MESSAGE}"]


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "a-b", "x" * 255, "0" * 40, ".hidden/a", "a.b/c-"])
def test_revisions_huggingface_hub_takes_pass(revision):
    assert model_problems(revision=revision) == []


# The stack's .env: no variable that docker compose reads for itself.

COMPOSE_MESSAGE = ("expected a variable compose itself does not read "
                   "(COMPOSE_* and DOCKER_* change how docker compose runs)")


@pytest.mark.parametrize("name", ["COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "DOCKER_HOST", "DOCKER_CONFIG",
                                  "COMPOSE_", "DOCKER_"])
def test_stack_env_and_secrets_cannot_set_what_compose_reads(name):
    assert problems_for(stack_env={name: "x"}) == [f"gpu-01: stack_env = {{{name!r}: 'x'}}: {COMPOSE_MESSAGE}"]
    assert problems_for(stack_secrets=[name]) == [f"gpu-01: stack_secrets = [{name!r}]: {COMPOSE_MESSAGE}"]


def test_names_that_only_look_like_compose_settings_pass(monkeypatch):
    names = ["MY_COMPOSE_FILE", "DOCKERFILE", "COMPOSEX", "DOCKER", "ARCHON_DOCKER_HOST"]
    for name in names:
        monkeypatch.setenv(name, "1")
    assert problems_for(stack_env={name: "1" for name in names},
                        stack_secrets=[*names, "SUPABASE_URL", "SUPABASE_SERVICE_KEY"]) == []
    # service_models variables go to the container's environment, not to .env
    assert problems_for(service_models={"RERANKING_MODEL": "Qwen/Qwen3-Reranker-0.6B",
                                        "DOCKER_MODEL": "Qwen/Qwen3-Reranker-0.6B"}) == []


# The HF endpoint's credentials, and HF_TOKEN over plain http.

LITERAL = "expected credentials as ${VAR} from the control node's environment, not written out"


@pytest.mark.parametrize("endpoint", ["https://ci:hunter2@hf.corp", "https://hf_sEcReT@hf.corp:8443/",
                                      "http://ci:pre${HF_PW}@hf.corp", "https://${HF_USER}:x@hf.corp"])
def test_an_endpoint_with_a_literal_password_is_refused(monkeypatch, endpoint):
    monkeypatch.setenv("HF_PW", "pw")
    monkeypatch.setenv("HF_USER", "ci")
    problems = problems_for(hf_endpoint=endpoint)
    assert problems == [f"gpu-01: hf_endpoint = {secrets.masked(endpoint)!r}: {LITERAL}"]
    assert "hunter2" not in problems[0] and "sEcReT" not in problems[0]


@pytest.mark.parametrize("endpoint", ["https://ci:${HF_PW}@hf.corp", "https://${HF_USER}:${HF_PW}@hf.corp/",
                                      "https://${HF_PW}@hf.corp", "http://hf.corp:8090"])
def test_an_endpoint_with_credentials_from_the_environment_passes(monkeypatch, endpoint):
    monkeypatch.setenv("HF_PW", "pw")
    monkeypatch.setenv("HF_USER", "ci")
    assert problems_for(hf_endpoint=endpoint) == []


def test_an_endpoint_credential_must_be_set_on_the_control_node(monkeypatch):
    monkeypatch.delenv("HF_PW", raising=False)
    assert problems_for(hf_endpoint="https://ci:${HF_PW}@hf.corp") == [
        "gpu-01: hf_endpoint = 'https://***@hf.corp': expected ${HF_PW} to be set in the control node's environment"
    ]


HOST_MODE = ("model_mode 'host' sends the endpoint to every host; an endpoint with credentials needs "
             "model_mode 'control'")


def test_host_mode_refuses_an_endpoint_with_credentials(monkeypatch):
    monkeypatch.setenv("HF_PW", "pw")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert problems_for(model_mode="host", hf_endpoint="https://ci:${HF_PW}@hf.corp") == [
        f"gpu-01: hf_endpoint = 'https://***@hf.corp': {HOST_MODE}"
    ]
    assert problems_for(model_mode="host", hf_endpoint="https://hf.corp/${HF_PW}") == [
        f"gpu-01: hf_endpoint = 'https://hf.corp/${{HF_PW}}': {HOST_MODE}"
    ]
    assert problems_for(model_mode="host", hf_endpoint="http://hf.corp:8090") == []
    assert problems_for(model_mode="control", hf_endpoint="https://ci:${HF_PW}@hf.corp") == []
    assert problems_for(model_mode="host") == []
    monkeypatch.setenv("HF_ENDPOINT", "https://ci:${HF_PW}@hf.corp")  # "" is $HF_ENDPOINT: it goes to the hosts
    assert problems_for(model_mode="host") == [
        f"gpu-01: hf_endpoint = '': {HOST_MODE} ('' is $HF_ENDPOINT, which has them)"
    ]


def test_hf_endpoint_from_the_environment_is_held_to_the_settings_own_rules(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://ci:hunter2@hf.corp")
    problems = problems_for()
    assert problems == [f"gpu-01: hf_endpoint = '': {LITERAL} ('' is $HF_ENDPOINT, which is 'https://***@hf.corp')"]
    assert "hunter2" not in problems[0]
    assert problems_for(hf_endpoint="https://hf.corp") == []  # the setting, when given, is what is used
    monkeypatch.setenv("HF_ENDPOINT", "https://ci:${HF_PW}@hf.corp")
    monkeypatch.delenv("HF_PW", raising=False)
    assert problems_for() == ["gpu-01: hf_endpoint = '': expected ${HF_PW} to be set in the control node's "
                              "environment ('' is $HF_ENDPOINT, which is 'https://***@hf.corp')"]
    monkeypatch.setenv("HF_PW", "pw")
    assert problems_for() == []
    monkeypatch.setenv("HF_ENDPOINT", "hf.corp")
    assert problems_for() == ["gpu-01: hf_endpoint = '': expected an http(s):// or file:// URL ('' is "
                              "$HF_ENDPOINT, which is 'hf.corp')"]


# A builder reached over plain tcp:// gets the credentials it is given in clear.

PLAIN_TCP = ("an engine reached by ssh:// or TLS while {given} are configured: a plain tcp:// engine gets them in "
             "clear{where}; use 'ssh://root@<builder>', or '' with DOCKER_HOST=tcp://<builder>:2376 and "
             "DOCKER_TLS_VERIFY=1 (and DOCKER_CERT_PATH)")


@pytest.mark.parametrize(("credentials", "given"), [
    ({"pip_index_url": "https://ci:${IDX_PW}@pypi.corp/simple"}, "index credentials"),
    ({"pip_find_links": ["https://pypi.corp/links?token=${IDX_PW}"]}, "index credentials"),
    ({"registry_credentials": {"registry.corp": "ci:${IDX_PW}"}}, "registry_credentials"),
    ({"stack_secrets": ["IDX_PW"]}, "stack_secrets"),
])
def test_a_plain_tcp_builder_is_refused_where_it_would_get_credentials(monkeypatch, credentials, given):
    monkeypatch.setenv("IDX_PW", "pw")
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    settings = {"stack_secrets": [], **credentials}
    assert problems_for(ml_env_builder="tcp://10.0.0.5:2375", **settings) == [
        f"gpu-01: ml_env_builder = 'tcp://10.0.0.5:2375': {PLAIN_TCP.format(given=given, where='')}"]
    assert problems_for(ml_env_builder="tcp://10.0.0.5:2376", **settings)  # the port says nothing: no TLS is set
    assert problems_for(ml_env_builder="ssh://root@10.0.0.5", **settings) == []
    assert problems_for(ml_env_builder="unix:///run/docker.sock", **settings) == []
    assert problems_for(ml_env_builder="tcp://10.0.0.5:2375", stack_secrets=[]) == []  # nothing secret to send
    monkeypatch.setenv("DOCKER_HOST", "tcp://10.0.0.5:2375")  # '' is $DOCKER_HOST, plain unless TLS is asked for
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "")
    where = " ('' is $DOCKER_HOST, 'tcp://10.0.0.5:2375', without DOCKER_TLS_VERIFY)"
    assert problems_for(ml_env_builder="", **settings) == [
        f"gpu-01: ml_env_builder = '': {PLAIN_TCP.format(given=given, where=where)}"]
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
    assert problems_for(ml_env_builder="", **settings) == []


def test_hf_token_over_http_is_a_flag_off_by_default():
    assert HostConfig(**DEFAULTS).hf_token_over_http is False
    assert problems_for(hf_token_over_http="yes") == ["gpu-01: hf_token_over_http = 'yes': expected True or False"]
    config, problems = validate_settings("gpu-01", {**DEFAULTS, "hf_token_over_http": "true"})
    assert problems == [] and config.hf_token_over_http is True


@pytest.mark.parametrize(("endpoint", "allow_http", "token"), [
    ("http://hf-mirror.corp:8090", False, False),
    ("HTTP://hf-mirror.corp", False, False),
    ("http://ci:${HF_PW}@hf-mirror.corp", False, False),
    ("http://hf-mirror.corp:8090", True, None),
    ("https://huggingface.co", False, None),
    ("https://hf-mirror.corp", True, None),
])
def test_hf_token_goes_to_a_plain_http_endpoint_only_when_allowed(endpoint, allow_http, token):
    assert hub.token_for(endpoint, allow_http) is token  # False: huggingface_hub sends no token at all


def test_the_endpoint_is_expanded_only_for_the_control_nodes_request_and_shown_masked(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_PW", "s3cr3t-pw")
    asked = []

    class Api:
        def __init__(self, endpoint, token):
            asked.append((endpoint, token))

        def repo_info(self, repo_id, **_):
            raise ValueError(f"cannot reach {asked[-1][0]}/api/models/{repo_id}")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    config, problems = validate_settings("gpu-01", {**DEFAULTS, "hf_endpoint": "http://ci:${HF_PW}@hf.corp",
                                                "hf_control_cache_dir": str(tmp_path)})
    assert problems == [] and hub.endpoint_of(config) == "http://ci:${HF_PW}@hf.corp"
    with pytest.raises(hub.ModelError) as refused:
        hub.resolve_model(config, 0, config.models[0])
    assert asked == [("http://ci:s3cr3t-pw@hf.corp", False)]
    assert "s3cr3t-pw" not in str(refused.value)
    assert str(refused.value) == ("ValueError: cannot reach http://ci:***@hf.corp/api/models/"
                                  "Qwen/Qwen3-Reranker-0.6B")


def test_secrets_in_an_error_are_scrubbed_as_is_and_percent_encoded(monkeypatch):
    monkeypatch.setenv("HF_PW", "p@ss/word")
    text = "GET https://ci:p%40ss%2Fword@hf.corp failed; also p@ss/word"
    assert secrets.scrubbed(text, "https://ci:${HF_PW}@hf.corp") == "GET https://ci:***@hf.corp failed; also ***"
    assert secrets.scrubbed(text, "https://hf.corp") == text


@pytest.mark.parametrize("overrides, problem", [
    ({"model_cache_dir_mode": "0777"},
     "model_cache_dir_mode = '0777': a mode without write for others (every local user could plant links there)"),
    ({"compose_project_dir_uid": 1000},
     "compose_project_dir_uid = 1000: 0: docker compose runs as root and reads this directory, so its owner decides "
     "what root runs"),
    ({"stack_root_uid": 1000},
     "stack_root_uid = 1000: 0: stack_root holds other configured directories, which a non-root owner could "
     "replace with links"),
    ({"model_cache_dir_gid": 1000, "model_cache_dir_mode": "2775"},
     "model_cache_dir_mode = '2775': a mode without group write while model_cache_dir_uid is 0: root works there "
     "and group 1000 could plant links"),
])
def test_directories_root_works_in_are_roots_alone(overrides, problem):
    problems = problems_for(**overrides)
    assert len(problems) == 1 and problems[0].startswith(f"gpu-01: {problem}"), problems


@pytest.mark.parametrize("overrides", [
    {"model_cache_dir_uid": 1000, "model_cache_dir_gid": 1000, "model_cache_dir_mode": "2775"},  # worked as uid 1000
    {"ml_env_dir_uid": 1234, "ml_env_dir_gid": 2345},
    {"compose_project_dir_gid": 1000, "compose_project_dir_mode": "0750"},  # a group may read the project
    {"stack_root": "/srv/alone", "stack_root_uid": 1000},  # holds nothing else: may be a user's
])
def test_non_root_owners_where_the_deploy_works_as_them_are_valid(overrides):
    assert problems_for(**overrides) == []


def test_service_gpus_have_their_shape():
    assert problems_for(service_gpus={"archon-server": [0, 1], "archon-mcp": 2, "archon-agents": "all"}) == []
    for bad in ({"archon-server": 0}, {"archon-server": [0, 0]}, {"archon-server": []}, {"archon-server": "any"},
                {"archon-server": True}, {"archon-server": [-1]}):
        (problem,) = problems_for(service_gpus=bad)
        assert problem.startswith("gpu-01: service_gpus = ") and problem.endswith(
            "expected 'all', a number of GPUs from 1 to 64, or a list of distinct GPU indices such as [0, 1]"), problem


@pytest.mark.parametrize("url", ["http://{host}:8181/health", "https://lb.corp/api/health?deep=1", "http://[::1]:80/"])
def test_http_checks_are_urls_with_the_host_as_a_placeholder(url):
    assert problems_for(http_checks=[url]) == []


@pytest.mark.parametrize("url", ["{host}:8181/health", "http://{host}:8181/$(id)", "ftp://{host}/", "http://{hots}/"])
def test_http_checks_refuse_what_is_not_an_http_url(url):
    (problem,) = problems_for(http_checks=[url])
    assert problem.endswith("expected http(s) URLs such as 'http://{host}:8181/health' ({host}: the host's address)")


def test_registry_credentials_take_the_password_from_the_environment_only(monkeypatch):
    monkeypatch.setenv("REG_PW", "x")
    assert problems_for(registry_credentials={"registry.corp:5000": "ci:${REG_PW}"}) == []
    assert problems_for(registry_credentials={"registry.corp:5000": "${REG_PW}:${REG_PW}"}) == []
    for bad, expected in [({"registry.corp": "ci:hunter2"}, "expected 'user:${PASSWORD_VAR}'"),
                          ({"registry.corp": "ci:${NOT_SET_ANYWHERE}"}, "expected ${NOT_SET_ANYWHERE} to be set"),
                          ({"https://registry.corp": "ci:${REG_PW}"}, "expected a registry host[:port]")]:
        (problem,) = problems_for(registry_credentials=bad)
        assert expected in problem and "hunter2" not in problem, problem
