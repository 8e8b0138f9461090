"""The deploy's additions as data: the override it generates, what it escapes, what it leaves to the project.
The projects are files/stacks/*, read by docker compose itself (the control node's CLI)."""

import base64
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from archon_render import BASE, COMMIT, DEFAULTS, GPUS, QWEN, SALT, SECRETS, rendered

from tasks.config import ModelSpec
from tasks.control.compose_project import ComposeProject, project_of
from tasks.control.hub import Snapshot
from tasks.control.image_archives import chain_ids
from tasks.control.registry import RegistryImage
from tasks.host.gpu_checks import Gpu, GpuRequestError
from tasks.host.ml_env import EnvPlan
from tasks.host.stack import ContainerState, StackState, _diff, masked_env_diff, plan_stack
from tasks.host.stack_health import check_url
from tasks.host.stack_images import HeldLayersFact, ServiceImage
from tasks.host.stack_render import MANIFEST, digest_salt, dotenv_line, escape, render
from tasks.validation import validate_host


def override(out) -> dict:
    return yaml.safe_load(out.override)["services"]


def test_archon_services_get_the_env_the_model_and_gpus_only_where_ml_services_and_service_gpus_say():
    _, out = rendered(gpus=GPUS, ml_env_dir="/srv/ml-env_1")
    services = override(out)
    server = services["archon-server"]
    assert server["image"] == "archon:0123" and "network_mode" not in server
    assert {"type": "bind", "source": "/srv/ml-env_1/envs/env-0123456789abcdef", "target": "/root/.local",
            "read_only": True} in server["volumes"]
    assert server["environment"]["PYTHONPATH"] == "/root/.local/lib/python3.11/site-packages"
    assert ((server["environment"]["RERANKING_MODEL"], server["environment"]["RERANKING_MODEL_REVISION"])
            == (QWEN, COMMIT))
    assert server["environment"]["HF_HUB_OFFLINE"] == "1"
    assert server["labels"]["mlstack.env-id"] == "env-0123456789abcdef"
    assert server["labels"]["mlstack.models"] == f"{QWEN}@{COMMIT}"
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [GPUS[0].uuid]
    # the others: our labels and their built image's tag only; ports, networks, commands stay the project's
    for name in ("archon-mcp", "archon-agents", "archon-frontend"):
        assert set(services[name]) == {"image", "labels"}, services[name]
        assert set(services[name]["labels"]) == {"mlstack.image", "mlstack.config"}
    assert "k$y" not in out.override and "supabase.co" not in out.override  # secrets only in .env
    assert out.dotenv == ('COMPOSE_FILE="compose.yaml:compose.mlstack.yml"\nCOMPOSE_PROJECT_NAME="archon"\n'
                          'COMPOSE_PROFILES=""\nMLSTACK_BASE_IMAGE="python:3.11-slim-bookworm"\n'
                          'SUPABASE_URL="https://x.supabase.co"\nSUPABASE_SERVICE_KEY="k\\$y"\n')


def test_the_project_files_are_shipped_as_they_are_with_the_override_beside_them():
    _, out = rendered()
    project = ComposeProject.load("archon")
    assert out.files["compose.yaml"] == (project.directory / "compose.yaml").read_bytes()
    assert set(out.files) == {*project.files_to_ship(), "compose.mlstack.yml"}
    assert "python/Dockerfile.server" in out.files and ".env" not in out.files
    assert "  compose.mlstack.yml\n" in out.manifest and len(out.manifest.splitlines()) == len(out.files)


def test_a_secret_changes_the_config_label_of_the_services_that_read_it_only():
    _, before = rendered()
    config, problems = validate_host("gpu-01", {**DEFAULTS})
    env = EnvPlan("env-0123456789abcdef", None, False, False, (), BASE)
    project = project_of(config)
    images = {name: ServiceImage("archon:0123") for name in project.services}
    after = render(project, config, env, [Snapshot(ModelSpec(repo_id=QWEN), COMMIT, (), "{}")], images, [],
                   {**SECRETS, "SUPABASE_SERVICE_KEY": "rotated"}, SALT)
    changed = {name for name in project.services
               if before.labels[name]["mlstack.config"] != after.labels[name]["mlstack.config"]}
    assert changed == {"archon-server", "archon-mcp", "archon-agents"}  # not archon-frontend: it reads no secret


def test_the_digest_and_labels_keep_salted_scrypt_fingerprints_of_values_never_a_plain_hash():
    _, out = rendered()
    assert out.digest.splitlines()[0] == f"# salt {SALT}"
    key = hashlib.scrypt(b"k$y", salt=bytes.fromhex(SALT), n=2**14, r=8, p=1, dklen=16).hex()
    assert f"SUPABASE_SERVICE_KEY={key}\n" in out.digest
    plain = {hashlib.sha256(form).hexdigest()[:16] for form in (b"k$y", b'"k$y"')}
    assert not any(hashed in out.digest + json.dumps(out.labels) for hashed in plain)
    _, resalted = rendered(salt="6a17" * 8)  # another host's salt: other fingerprints, other labels
    assert f"SUPABASE_SERVICE_KEY={key}" not in resalted.digest
    assert resalted.labels["archon-server"]["mlstack.config"] != out.labels["archon-server"]["mlstack.config"]


def test_a_host_keeps_the_salt_of_its_digest_and_a_new_host_gets_the_control_nodes(tmp_path):
    config, _ = rendered(image_cache_dir=str(tmp_path))
    assert digest_salt(config, f"# salt {SALT}\nA=1\n") == SALT
    made = digest_salt(config, None)
    assert re.fullmatch(r"[0-9a-f]{32}", made) and made != SALT
    assert (tmp_path / "env-digest.salt").read_text() == made
    assert digest_salt(config, "# salt not-hex\n") == made  # a malformed line read back is not used


def test_variables_each_service_reads_with_and_without_defaults():
    reads = ComposeProject.load("archon").reads("archon-mcp")
    assert reads["SUPABASE_URL"] is False and reads["ARCHON_SERVER_PORT"] is True
    assert ComposeProject.load("reranker").reads("reranker") == {"MLSTACK_BASE_IMAGE": False,
                                                                  "MLSTACK_API_KEY": True}


EIGHT = [Gpu(i, f"GPU-5a7f8c3e-1b2d-4e6f-9a8b-0c1d2e3f4a{i:02x}", "NVIDIA H100 80GB HBM3", 81559, "580.159.04", "9.0")
         for i in range(8)]


def reservation(out, service) -> list[str] | None:
    spec = override(out)[service]
    return spec["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] if "deploy" in spec else None


def test_each_service_gets_the_gpus_assigned_to_it_by_uuid_and_the_others_none():
    _, out = rendered(gpus=EIGHT, service_gpus={"archon-server": [6, 7], "archon-mcp": 2, "archon-agents": "all"},
                      stack_profiles=["agents"])
    assert reservation(out, "archon-server") == [EIGHT[6].uuid, EIGHT[7].uuid]
    assert reservation(out, "archon-mcp") == [EIGHT[0].uuid, EIGHT[1].uuid]
    assert reservation(out, "archon-agents") == [gpu.uuid for gpu in EIGHT]
    assert reservation(out, "archon-frontend") is None  # not assigned: no GPU
    _, none = rendered(gpus=EIGHT, service_gpus={})
    assert reservation(none, "archon-server") is None


@pytest.mark.parametrize(("request_", "message"), [
    (9, "service_gpus.archon-server = 9: this host has 8 GPU(s)"),
    ([7, 8], "service_gpus.archon-server = [7, 8]: this host has no GPU 8 (its GPUs: 0, 1, 2, 3, 4, 5, 6, 7)"),
])
def test_a_host_with_fewer_gpus_than_asked_for_is_refused(request_, message):
    with pytest.raises(GpuRequestError) as error:
        rendered(gpus=EIGHT, service_gpus={"archon-server": request_})
    assert str(error.value) == message


def test_all_on_a_cpu_host_is_no_gpu_but_a_count_is_refused():
    _, out = rendered(gpus=[], service_gpus={"archon-server": "all"})
    assert reservation(out, "archon-server") is None
    with pytest.raises(GpuRequestError, match="service_gpus.archon-server = 1: this host has 0 GPU"):
        rendered(gpus=[], service_gpus={"archon-server": 1})


def test_no_gpu_no_reservation():
    _, out = rendered()
    assert "deploy" not in override(out)["archon-server"]


def test_values_injected_into_compose_keep_a_dollar_literal():
    # Configured paths cannot hold a `$` (tasks/config.py refuses it); what render injects is escaped all the same.
    assert escape("/srv/ml $env ${X}") == "/srv/ml $$env $${X}"


def test_dotenv_lines_escape_what_compose_would_interpret():
    assert dotenv_line("A", "x: y # z") == 'A="x: y # z"'
    assert dotenv_line("A", "it's \"q\" $HOME ${X} a\\b\nl") == 'A="it\'s \\"q\\" \\$HOME \\${X} a\\\\b\\nl"'


def test_the_env_diff_names_keys_never_values():
    assert masked_env_diff("A=1\nB=2\n", "A=1\nB=3\nC=4\n") == ["+ C=***", "~ B=*** (changed)"]


def test_reasons_name_what_changed_for_each_service():
    config, out = rendered(stack="reranker", service_models={"RERANKING_MODEL": QWEN}, models=[{"repo_id": QWEN}],
                           service_gpus={}, ml_services={"reranker": {"models": ["RERANKING_MODEL"]}})
    tags = {"reranker": ServiceImage("tag"), "docs": ServiceImage("tag")}
    labels = out.labels["reranker"]
    running = {
        "reranker": ContainerState("running", "healthy",
                                   {**labels, "mlstack.config": "old", "mlstack.env-id": "env-old"}),
        "docs": ContainerState("running", "healthy", out.labels["docs"]),
    }
    texts = {MANIFEST: out.manifest, ".env.digest": out.digest}
    state = StackState({"tag": "sha256:img"}, running, texts)
    plan = plan_stack(state, out, tags, ["reranker", "docs"])
    assert plan.recreate == {"reranker": "env id env-old → env-0123456789abcdef"} and not plan.push
    assert plan.send_images == ()
    # docker reads a label a container lacks as "": the docs service (no env, no model) changed its config only.
    as_docker_reads = {"mlstack.env-id": "", "mlstack.models": "", **out.labels["docs"], "mlstack.config": "old"}
    docs = ContainerState("running", "healthy", as_docker_reads)
    edited = StackState({"tag": "sha256:img"}, {**running, "docs": docs}, texts)
    assert plan_stack(edited, out, tags, ["reranker", "docs"]).recreate["docs"] == "config"
    stopped = StackState({}, {"docs": ContainerState("exited", "", out.labels["docs"])}, {})
    plan = plan_stack(stopped, out, tags, ["reranker", "docs"])
    assert plan.recreate == {"reranker": "not running", "docs": "exited"}
    assert plan.send_images == ("tag",) and plan.push


def test_a_shipped_registry_image_is_sent_where_the_host_has_another_id_and_never_pulled_there():
    config, out = rendered(stack="reranker", service_gpus={}, ml_services={})
    held = RegistryImage("registry.corp/tools:1", "sha256:" + "d" * 64, "sha256:" + "b" * 64, 10**8)
    images = {"docs": ServiceImage("registry.corp/tools:1", "ship", held),
              "reranker": ServiceImage("registry.corp/api:2", "pull")}
    project = project_of(config)
    env = EnvPlan("env-0123456789abcdef", None, False, False, (), BASE)
    out = render(project, config, env, [], images, [], {}, SALT)
    assert override(out)["docs"]["pull_policy"] == "never" and "image" not in override(out)["docs"]
    assert override(out)["docs"]["labels"]["mlstack.image"] == "registry.corp/tools:1 (dddddddddddd)"  # digest
    assert "pull_policy" not in override(out)["reranker"]
    running = {name: ContainerState("running", "healthy", out.labels[name]) for name in ("docs", "reranker")}
    texts = {MANIFEST: out.manifest, ".env.digest": out.digest}
    other_id = StackState({"registry.corp/tools:1": "sha256:" + "c" * 64}, running, texts)
    assert plan_stack(other_id, out, images, ["docs", "reranker"]).send_images == ("registry.corp/tools:1",)
    same_id = StackState({"registry.corp/tools:1": "sha256:" + "b" * 64}, running, texts)
    assert plan_stack(same_id, out, images, ["docs", "reranker"]).send_images == ()  # and the pulled one is not sent
    # The builder does not hold the registry's current image yet: its id is unknown, so every host gets it.
    not_pulled = {**images, "docs": ServiceImage("registry.corp/tools:1", "ship",
                                                 RegistryImage("registry.corp/tools:1", "sha256:" + "d" * 64, "", 0))}
    assert plan_stack(same_id, out, not_pulled, ["docs", "reranker"]).send_images == ("registry.corp/tools:1",)


def test_a_service_using_an_environment_secret_reads_its_variable(tmp_path):
    (tmp_path / "compose.yaml").write_text(
        "services:\n"
        "  api: {image: x, secrets: [{source: key, mode: 0400}], environment: ['LEVEL=${LEVEL:-info}']}\n"
        "  web: {image: y}\n"
        "secrets:\n  key: {environment: API_KEY}\n")
    project = ComposeProject.load(str(tmp_path))
    assert project.reads("api") == {"LEVEL": True, "API_KEY": False}
    assert project.reads("web") == {}


def test_a_check_url_gets_the_host_address_ipv6_in_brackets():
    assert check_url("http://{host}:8080/health", "10.0.0.5") == "http://10.0.0.5:8080/health"
    assert check_url("http://{host}:8080/health", "fd00::5") == "http://[fd00::5]:8080/health"
    assert check_url("https://lb.corp/health", "10.0.0.5") == "https://lb.corp/health"


def test_a_diff_shows_control_characters_read_back_from_a_host_escaped():
    lines = _diff("image: x\x1b]2;owned\x07\n", "image: y\n", "compose.yaml")
    assert "-image: x\\x1b]2;owned\\x07" in lines and not any("\x1b" in line for line in lines)


def test_the_probe_reads_every_images_layers_as_chain_ids_and_whether_docker_load_skips_those_it_holds():
    lower, upper = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    held = HeldLayersFact().process(sent([f"layers {lower} {upper} ", "layers sha256:not-a-layer",
                                          'store [["Backing Filesystem","extfs"],["Supports d_type","true"]]']))
    assert held.layers == frozenset(chain_ids([lower, upper])) and held.loads_partial
    assert not HeldLayersFact().process(sent(['store [["driver-type","io.containerd.snapshotter.v1"]]'])).loads_partial
    assert not HeldLayersFact().process([]).loads_partial  # no answer: the whole archive, as before
    assert HeldLayersFact().process(["not base64!"]) == HeldLayersFact().process([])  # not what the probe sends


def sent(lines: list[str]) -> list[str]:
    """LINES as a host sends them (tasks/host/probe.py `carried`: base64)."""
    return base64.encodebytes("".join(line + "\n" for line in lines).encode()).decode().splitlines()


PROJECT_DOTENV = """# the team's own settings
LEVEL=debug
export GREETING='hello $USER'
BANNER="two
lines"
TOKEN=from-the-project
"""


def dotenv_project(tmp_path: Path, dotenv: str = PROJECT_DOTENV) -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "compose.yaml").write_text(
        "services:\n"
        "  api:\n    image: x\n    environment:\n"
        "      - LEVEL=${LEVEL}\n      - GREETING=${GREETING}\n      - BANNER=${BANNER}\n      - TOKEN=${TOKEN}\n"
        "  web:\n    image: y\n    environment:\n      - NAME=${NAME:-web}\n")
    (tmp_path / ".env").write_text(dotenv)
    return tmp_path


def render_dotenv_project(project_dir: Path, **overrides):
    config, problems = validate_host("gpu-01", {"stack": str(project_dir), **overrides})
    assert problems == []
    env = EnvPlan("env-0123456789abcdef", None, False, False, (), BASE)
    project = project_of(config)
    return project, render(project, config, env, [], {}, [], {}, SALT)


def test_the_projects_own_dotenv_is_the_base_and_the_deploys_values_override_per_key(tmp_path):
    project_dir = dotenv_project(tmp_path / "project")
    project, out = render_dotenv_project(project_dir, stack_env={"TOKEN": "from-the-deploy"}, stack_profiles=["gpu"])
    assert ".env" not in out.files  # the deploy writes the one .env; the project's is its base, not a file
    assert out.dotenv.splitlines()[:3] == ['COMPOSE_FILE="compose.yaml:compose.mlstack.yml"',
                                           f'COMPOSE_PROJECT_NAME="{project.name}"', 'COMPOSE_PROFILES="gpu"']
    assert "from-the-project" not in out.dotenv and "TOKEN=from-the-project" not in out.digest
    # What compose itself reads from the host's .env, the project's entries as written (quotes, export, lines).
    on_host = tmp_path / "on-host"
    on_host.mkdir()
    for name, data in out.files.items():
        (on_host / name).write_bytes(data)
    (on_host / ".env").write_text(out.dotenv)
    model = json.loads(subprocess.run(["docker", "compose", "config", "--format", "json"], cwd=on_host, check=True,
                                      capture_output=True, text=True, env={"PATH": os.environ["PATH"]}).stdout)
    # (config prints a literal `$` as `$$`: single quotes kept `$USER` from being interpolated)
    assert model["services"]["api"]["environment"] == {"LEVEL": "debug", "GREETING": "hello $$USER",
                                                       "BANNER": "two\nlines", "TOKEN": "from-the-deploy"}
    assert [key for key in re.findall(r"^(\w+)=", out.digest, flags=re.M)] == [
        "COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES", "MLSTACK_BASE_IMAGE", "TOKEN",
        "LEVEL", "GREETING", "BANNER"]


def test_a_change_in_the_projects_dotenv_recreates_only_the_services_that_read_it(tmp_path):
    project_dir = dotenv_project(tmp_path)
    _, before = render_dotenv_project(project_dir)
    (project_dir / ".env").write_text(PROJECT_DOTENV.replace("LEVEL=debug", "LEVEL=info"))
    ComposeProject.load.cache_clear()
    _, after = render_dotenv_project(project_dir)
    assert masked_env_diff(before.digest, after.digest) == ["~ LEVEL=*** (changed)"]
    assert before.labels["api"]["mlstack.config"] != after.labels["api"]["mlstack.config"]
    assert before.labels["web"]["mlstack.config"] == after.labels["web"]["mlstack.config"]


def test_a_variable_the_projects_dotenv_gives_needs_no_setting_and_one_it_lacks_is_named(tmp_path):
    project_dir = dotenv_project(tmp_path)
    assert validate_host("gpu-01", {"stack": str(project_dir)})[1] == []
    (project_dir / ".env").write_text("LEVEL=debug\n")
    ComposeProject.load.cache_clear()
    problems = validate_host("gpu-01", {"stack": str(project_dir)})[1]
    assert problems == [f"gpu-01: stack = {str(project_dir)!r}: a value for ${{{name}}}, which api read without a "
                        "default: set it in stack_env or stack_secrets" for name in ("GREETING", "BANNER", "TOKEN")]


@pytest.mark.parametrize(("dotenv", "message"), [
    ("LEVEL=debug\nnot an entry\n", "line 2: expected KEY=value"),
    ('BANNER="never closed\n', "the value of BANNER opens a \" quote that never closes"),
])
def test_a_dotenv_compose_could_not_read_is_refused_without_showing_its_lines(tmp_path, dotenv, message):
    project_dir = dotenv_project(tmp_path, dotenv)
    problems = validate_host("gpu-01", {"stack": str(project_dir)})[1]
    assert len(problems) == 1 and message in problems[0] and "never closed" not in problems[0].split(":", 3)[-1]


def test_public_fingerprints_are_remembered_and_equal(tmp_path, monkeypatch):
    """The deploy's own values' fingerprints come from the control node's memo once made, equal to scrypt's."""
    from types import SimpleNamespace

    from tasks.host import stack_render
    from tasks.secrets import fingerprint

    memo = stack_render.PublicFingerprints(tmp_path / "memo.json")
    assert memo("reranker", SALT) == fingerprint("reranker", SALT)
    monkeypatch.setattr(stack_render, "fingerprint", lambda value, salt: pytest.fail("scrypt on a remembered value"))
    assert stack_render.PublicFingerprints(tmp_path / "memo.json")("reranker", SALT) == fingerprint("reranker", SALT)
    settings = SimpleNamespace(stack_env={"MLSTACK_BASE_IMAGE": "x"}, stack_secrets=["COMPOSE_PROFILES"])
    assert stack_render.public_keys(settings) == {"COMPOSE_FILE", "COMPOSE_PROJECT_NAME"}  # type: ignore[arg-type]


def test_like_hosts_get_one_yaml_dump_of_their_override_and_other_services_their_own(monkeypatch):
    dumps = []
    monkeypatch.setattr(yaml, "safe_dump", lambda data, **options: dumps.append(data) or f"{len(dumps)}\n")
    config, _ = rendered(stack="reranker", service_gpus={}, ml_services={}, stack_profiles=["tools"])
    project, env = project_of(config), EnvPlan("env-0123456789abcdef", None, False, False, (), BASE)
    dumps.clear()
    like = [render(project, config, env, [], {}, [], {}, SALT).override for _ in range(3)]
    other = render(project, config, env, [], {"docs": ServiceImage("registry.corp/tools:1", "pull")}, [], {}, SALT)
    assert len(set(like)) == 1 and other.override not in like and len(dumps) == 2
