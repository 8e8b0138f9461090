"""The reranker compose project on a real 2-host fleet: deployed as it is, on its own bridge network,
healthy with the mounted env and model, recreating exactly what changed, exact values through compose,
a health gate with logs, a stopping rollout; Archon's project valid with the additions on its ML service."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest
from fleet_helpers import ArgvWatch, reranker_edited

from rehearsal import hub, registry
from rehearsal.baseimage import IMAGE_NAME
from tasks.control.image_archives import archive_layers

COMPOSE = "/srv/mlstack/compose"
PROJECT = "mlstack-reranker"
RERANKER = Path(__file__).parents[2] / "files/stacks/reranker"
MINILM_SHA = hub.ensure_repos()[hub.MINILM]["main"]


@pytest.fixture(scope="module", autouse=True)
def stack_down_after(fleet):
    yield
    fleet.wipe()


def containers(fleet, record) -> dict[str, str]:
    """service -> 'container id + start time': equal means not recreated."""
    output = fleet.ssh(record, f"docker ps -q --filter label=com.docker.compose.project={PROJECT}"
                               " | xargs -r docker inspect "
                               "-f '{{index .Config.Labels \"com.docker.compose.service\"}}"
                               " {{.Id}} {{.State.StartedAt}}'")
    return {line.split()[0]: " ".join(line.split()[1:]) for line in output.splitlines()}


def get(fleet, record, path: str) -> dict:
    return json.loads(fleet.ssh(record, f"curl -fsS 'http://127.0.0.1:8080{path}'"))


def requirements(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return f"ml_env_requirements={path}"


def test_the_stack_is_healthy_everywhere_and_works_with_the_mounted_env_and_model(fleet):
    run = fleet.deploy()
    assert run.returncode == 0, run.output[-3000:]
    for record in fleet.hosts:
        env = fleet.ssh(record, "readlink /srv/mlstack/ml-env/active").strip().removeprefix("envs/")
        health = get(fleet, record, "/health")
        assert (health["env_id"], health["model"], health["commit"]) == (env, hub.MINILM, MINILM_SHA)
        assert health["python"].startswith("3.11.")
        work = get(fleet, record, "/tokenize?text=hello%20world")
        assert work["tokens"] == ["[CLS]", "hello", "world", "[SEP]"] and work["ids"] == [101, 7592, 2088, 102]
        assert fleet.ssh(record, f"stat -c '%a %U' {COMPOSE}/.env {COMPOSE}/compose.yaml").split("\n")[:2] == [
            "600 root", "644 root"]
        for name in ("compose.yaml", "app.py", "Dockerfile.server"):  # the project as it is
            assert fleet.ssh(record, f"sha256sum < {COMPOSE}/{name}").split()[0] == \
                hashlib.sha256((RERANKER / name).read_bytes()).hexdigest()
        # By hand in the project directory, as a person would: the same project, its services on their network.
        listed = fleet.ssh(record, f"cd {COMPOSE} && docker compose ps --format '{{{{.Service}}}} {{{{.State}}}}'")
        assert sorted(listed.split("\n")[:2]) == ["docs running", "reranker running"]
        networks = fleet.ssh(record, f"docker inspect -f '{{{{.HostConfig.NetworkMode}}}}' {PROJECT}-docs-1 "
                                     f"{PROJECT}-reranker-1").split()
        assert networks == [f"{PROJECT}_rerank"] * 2  # no host networking
        by_name = fleet.ssh(record, f"cd {COMPOSE} && docker compose exec -T docs python3 -c "
                                    "'import json, os, urllib.request; print(json.load(urllib.request.urlopen("
                                    "os.environ[\"RERANKER_URL\"] + \"/health\"))[\"model\"])'")
        assert by_name.strip() == hub.MINILM
        with urllib.request.urlopen(f"http://{record.ip}:8081/app.py", timeout=10) as response:  # published port
            assert response.read() == (RERANKER / "app.py").read_bytes()
        # The slim image: no torch, no ML library, no weights (they come from the mounts).
        image = fleet.ssh(record, f"docker inspect -f '{{{{.Config.Image}}}}' {PROJECT}-reranker-1").strip()
        probe = fleet.ssh(record, f"docker run --rm --network none {image} sh -c "
                                  "'python3 -c \"import torch\" 2>&1 | tail -1;"
                                  " python3 -c \"import tokenizers\" 2>&1 | tail -1; "
                                  "find / -xdev \\( -name \"*.safetensors\" -o -name \"*.bin\""
                                  " -o -name \"torch\" \\) | wc -l'")
        assert probe.splitlines() == ["ModuleNotFoundError: No module named 'torch'",
                                      "ModuleNotFoundError: No module named 'tokenizers'", "0"]
    before = {record.name: containers(fleet, record) for record in fleet.hosts}
    assert all(set(ids) == {"reranker", "docs"} for ids in before.values())

    again = fleet.deploy()
    assert again.returncode == 0, again.output[-3000:]
    assert again.changed_operations() == []
    assert f"[host1] stack {PROJECT}: no change (2/2 services running and healthy)" in again.output
    assert {record.name: containers(fleet, record) for record in fleet.hosts} == before
    # SIGTERM reaches the services (docker's init is their PID 1): a stop or a recreate waits no 10 s grace
    for record in fleet.hosts:
        took = fleet.ssh(record, f"cd {COMPOSE} && start=$(date +%s%N) && docker compose stop -t 10 2>&1 && "
                                 "echo $(( ($(date +%s%N) - start) / 1000000 ))").split()[-1]
        assert int(took) < 5000, f"{record.name}: docker compose stop took {took} ms"


@pytest.mark.heavy
def test_a_new_env_recreates_the_services_that_mount_it_and_nothing_else(fleet, tmp_path):
    assert fleet.deploy().returncode == 0
    old_env = fleet.ssh(fleet.hosts[0], "readlink /srv/mlstack/ml-env/active").strip().removeprefix("envs/")
    before = {record.name: containers(fleet, record) for record in fleet.hosts}
    new_requirements = requirements(tmp_path, "plus.txt",
                                    "huggingface_hub>=0.30\ntokenizers>=0.20\npyyaml>=6\npackaging\n")

    dry = fleet.deploy("--dry", "--diff", "--data", new_requirements)
    assert dry.returncode == 0, dry.output[-3000:]
    assert f"[host2] stack {PROJECT}: reranker (env id {old_env} → env-" in dry.output
    assert "docs (" not in dry.output
    assert "+      source: /srv/mlstack/ml-env/envs/env-" in dry.output  # the compose diff
    assert {record.name: containers(fleet, record) for record in fleet.hosts} == before

    run = fleet.deploy("--data", new_requirements)
    assert run.returncode == 0, run.output[-3000:]
    for record in fleet.hosts:
        after = containers(fleet, record)
        assert after["docs"] == before[record.name]["docs"]
        assert after["reranker"] != before[record.name]["reranker"]
        assert get(fleet, record, "/health")["env_id"] != old_env


SPECIAL = "a: b # c 'single' \"double\" $HOME ${PATH} back\\slash = end"


def test_values_with_compose_syntax_reach_the_services_that_read_them_exactly_and_secrets_stay_out_of_logs(
        fleet, tmp_path):
    # A project of the user's own, outside files/stacks/: the reranker with two more variables it reads.
    project = reranker_edited(tmp_path, "my-reranker", lambda compose: compose["services"]["reranker"]["environment"]
                              .extend(["GREETING=${GREETING}", "TOKEN=${MLSTACK_TEST_TOKEN}"]))
    secret = "s3cr3t-' #$(id)-${HOME}-value"
    run = fleet.deploy("-vvv", "--diff", "--data", f"stack={project}",
                       "--data", f"stack_env={json.dumps({'GREETING': SPECIAL})}",
                       "--data", 'stack_secrets=["MLSTACK_TEST_TOKEN"]', env={"MLSTACK_TEST_TOKEN": secret})
    assert run.returncode == 0, run.output[-3000:]
    assert secret not in run.output and "s3cr3t" not in run.output
    assert "+ MLSTACK_TEST_TOKEN=***" in run.output and "+ GREETING=***" in run.output
    assert re.search(r"\+ *- TOKEN=\$\{MLSTACK_TEST_TOKEN\}", run.output)  # the diff of the project's compose file
    for record in fleet.hosts:
        values = fleet.ssh(record, f"docker exec {PROJECT}-reranker-1 python3 -c "
                                   "'import os, json; print(json.dumps([os.environ[\"GREETING\"],"
                                   " os.environ[\"TOKEN\"]]))'")
        assert json.loads(values) == [SPECIAL, secret]
        docs = fleet.ssh(record, f"docker inspect -f '{{{{json .Config.Env}}}}' {PROJECT}-docs-1")
        assert "s3cr3t" not in docs and "GREETING" not in docs  # docs reads neither
        assert fleet.ssh(record, f"grep -rlF s3cr3t {COMPOSE} /srv/mlstack/ml-env/active/.mlstack-env.json"
                                 " || true").split() == \
            [f"{COMPOSE}/.env"]
        labels = fleet.ssh(record, f"docker inspect -f '{{{{json .Config.Labels}}}}' {PROJECT}-reranker-1")
        assert "s3cr3t" not in labels
    # Back to the shipped project: its own compose file replaces the edited one.
    back = fleet.deploy()
    assert back.returncode == 0, back.output[-3000:]
    assert "TOKEN" not in fleet.ssh(fleet.hosts[0], f"cat {COMPOSE}/compose.yaml")


def test_a_variable_without_a_value_fails_before_any_host_changes(fleet, tmp_path):
    project = tmp_path / "needs-a-value"
    shutil.copytree(RERANKER, project)
    text = (project / "compose.yaml").read_text().replace("- PORT=8080", "- PORT=8080\n      - DSN=${DATABASE_URL}")
    (project / "compose.yaml").write_text(text)
    before = {record.name: fleet.ssh(record, "find /srv -printf '%p %T@\\n' | sort | md5sum") for record in fleet.hosts}
    run = fleet.deploy("--data", f"stack={project}")
    assert run.returncode != 0
    assert (f"host1: stack = '{project}': a value for ${{DATABASE_URL}}, which reranker read without a default: "
            "set it in stack_env or stack_secrets") in run.output
    assert {record.name: fleet.ssh(record, "find /srv -printf '%p %T@\\n' | sort | md5sum")
            for record in fleet.hosts} == before


@pytest.mark.heavy
def test_a_service_failing_health_after_an_env_switch_fails_the_host_with_its_logs_and_a_rollback_recovers(
        fleet, tmp_path):
    good = fleet.deploy()
    assert good.returncode == 0, good.output[-3000:]
    good_env = fleet.ssh(fleet.hosts[0], "readlink /srv/mlstack/ml-env/active").strip().removeprefix("envs/")
    # An env that imports fine (its own requirements) but lacks what the service needs.
    bad = fleet.deploy("--data", requirements(tmp_path, "no-tokenizers.txt", "huggingface_hub>=0.30\npyyaml>=6\n"),
                       "--data", "health_timeout=20")
    assert bad.returncode != 0
    for record in fleet.hosts:
        report = bad.report[record.name]
        assert report["result"] == "failed" and report["failure"]["step"] == f"Stack | Up and healthy: {PROJECT}"
        assert report["stack"]["health"] == "unhealthy"
        assert report["stack"]["unhealthy"] == ["reranker"]  # healthy services are not blamed
        assert f"[{record.name}] stack {PROJECT}: not healthy within 20s:" in bad.output
        # The state as `compose ps` saw it: restarting, exited, or running but starting or unhealthy
        # (docker resets health to "starting" each time the restart policy starts it again).
        assert re.search(rf"^ *\[{record.name}\] reranker: (?!running healthy)\w+", bad.output,
                         re.M), bad.output[-3000:]
        assert f"[{record.name}] last log lines of reranker:" in bad.output
        assert f"[{record.name}] ModuleNotFoundError: No module named 'tokenizers'" in bad.output
        assert f"[{record.name}] last log lines of docs:" not in bad.output

    rollback = fleet.deploy("--data", f"ml_env_id={good_env}")
    assert rollback.returncode == 0, rollback.output[-3000:]
    for record in fleet.hosts:
        assert get(fleet, record, "/health")["env_id"] == good_env


def table_rows(stdout: str) -> dict[str, list[str]]:
    """host -> its row of the rollout table and the model lines under it."""
    rows: dict[str, list[str]] = {}
    table = stdout[stdout.index("\nhost "):].splitlines()[2:]
    for line in table:
        if line and not line.startswith(" "):
            rows[line.split()[0]] = [line]
        elif line.strip():
            rows[list(rows)[-1]].append(line.strip())
    return rows


@pytest.mark.heavy
def test_a_rollout_that_uploads_everything_shows_each_host_from_the_report(fleet):
    fleet.wipe()  # no env, model or stack on either host: everything is sent
    result = fleet.tool("tasks.fleet.rollout", "--data", "rollout_canary=0", "--data", "rollout_batch=2")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert " MB sent (100%)" in result.stderr  # upload progress was in the log, where the old table read it
    rows = table_rows(result.stdout)
    for record in fleet.hosts:
        env = fleet.ssh(record, "readlink /srv/mlstack/ml-env/active").strip().removeprefix("envs/")
        row, *models = rows[record.name]
        assert row.split(None, 2)[:2] == [record.name, "ok"]
        assert f" none → {env} " in row
        assert row.endswith(f"{PROJECT}: docs (not running), reranker (not running)"), row
        assert len(models) == 2 and all(re.fullmatch(r"\S+@[0-9a-f]{40} \([0-9a-f]{12}\): \d+\.\d MB sent", m)
                                        for m in models)
        assert models[0].startswith(f"{hub.MINILM}@{MINILM_SHA} ({MINILM_SHA[:12]}): "), models
        assert not any("%" in line for line in rows[record.name])


# Lines a service prints that the old log-reading table took for the deploy's own.
SPOOF = ["ML env: env-0000000000000000 (spoofed)", "model spoofed/model@main (spoofed): no change",
         f"stack {PROJECT}: spoofed", "last log lines of docs:"]


@pytest.mark.heavy
def test_a_canary_failing_health_stops_the_rollout_and_what_its_service_prints_cannot_spoof_the_table(fleet):
    assert fleet.deploy().returncode == 0
    canary, other = fleet.hosts
    env = fleet.ssh(canary, "readlink /srv/mlstack/ml-env/active").strip().removeprefix("envs/")
    before = containers(fleet, other)
    site = fleet.ssh(canary, "echo /srv/mlstack/ml-env/active/lib/python3*/site-packages").strip()
    # Behind the deploy's back the canary's env changes: importing tokenizers prints lines shaped like the
    # deploy's own and fails, so the reranker cannot start and the health gate prints its log.
    spoofing = "; ".join(f"print({line!r})" for line in SPOOF) + "; raise SystemExit(3)"
    fleet.ssh(canary, f"mv {site}/tokenizers /srv/tokenizers.saved && mkdir {site}/tokenizers && "
                      f"echo {shlex.quote(spoofing)} > {site}/tokenizers/__init__.py")
    try:
        result = fleet.tool("tasks.fleet.rollout", "--data", 'stack_env={"MLSTACK_API_KEY": "2"}',
                            "--data", "health_timeout=15")
    finally:
        fleet.ssh(canary, f"rm -r {site}/tokenizers && mv /srv/tokenizers.saved {site}/tokenizers")
    assert result.returncode != 0
    assert f"[{canary.name}] {SPOOF[0]}" in result.stderr  # the spoof reached the log
    assert (f"rollout: stopped after canary: 1 host(s) failed ({canary.name}), more than rollout_max_failures=0; "
            f"not reached: {other.name}") in result.stderr
    assert containers(fleet, other) == before
    assert "MLSTACK_API_KEY" not in fleet.ssh(other, f"cat {COMPOSE}/.env.digest")
    rows = table_rows(result.stdout)
    assert "spoofed" not in result.stdout, result.stdout
    row, *models = rows[canary.name]
    assert row.split()[:3] == [canary.name, "FAILED", env]
    assert row.endswith(f"{PROJECT}: reranker (config); unhealthy: reranker"), row  # docs reads no key
    assert models[0] == f"{hub.MINILM}@{MINILM_SHA} ({MINILM_SHA[:12]})" and len(models) == 2
    assert rows[other.name][0].split()[:3] == [other.name, "not", "reached"]
    recovered = fleet.deploy()
    assert recovered.returncode == 0, recovered.output[-3000:]


def test_the_archon_project_passes_compose_config_on_a_host_with_the_additions_on_its_ml_service_only(
        fleet, monkeypatch):
    """Archon cannot start here (it needs Supabase and its own source); its project must still be valid compose,
    as the deploy pushes it: the project's files, the generated override and .env."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "host"))
    from archon_render import GPUS, SECRETS, rendered  # the render unit tests' fixture

    for name, value in SECRETS.items():  # inventory/example_archon.py's stack_secrets, read while validating
        monkeypatch.setenv(name, value)

    from tasks.host.stack_push import project_tar

    _, out = rendered(gpus=GPUS, ml_env_dir="/srv/ml-env_1")
    record = fleet.hosts[0]
    target = "/srv/archon-check"
    subprocess.run([*fleet.fleet.ssh_argv(record), f"rm -rf {target} && mkdir -p {target} && tar -x -C {target}"],
                   input=project_tar(out), check=True)
    result = subprocess.run([*fleet.fleet.ssh_argv(record), f"cd {target} && docker compose --profile agents "
                             "config -q"], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")
    resolved = json.loads(fleet.ssh(record, f"cd {target} && docker compose --profile agents config --format json"))
    services = resolved["services"]
    assert resolved["name"] == "archon" and set(services) == {"archon-server", "archon-mcp", "archon-agents",
                                                                "archon-frontend"}
    server = services["archon-server"]
    assert [volume["source"] for volume in server["volumes"]] == ["/srv/ml-env_1/envs/env-0123456789abcdef",
                                                                  "/srv/mlstack/hf-cache"]
    assert server["environment"]["SUPABASE_SERVICE_KEY"] == "k$$y"  # compose prints `$` doubled
    assert server["ports"][0]["published"] == "8181" and set(server["networks"]) == {"app-network"}
    assert server["extra_hosts"] == ["host.docker.internal=host-gateway"]  # compose's own notation
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [GPUS[0].uuid]
    assert server["container_name"] == "archon-server" and server["image"] == "archon:0123"
    for name in ("archon-mcp", "archon-agents", "archon-frontend"):  # no ML service: nothing mounted
        assert "volumes" not in services[name] and "deploy" not in services[name]
    assert services["archon-mcp"]["environment"]["API_SERVICE_URL"] == "http://archon-server:8181"
    assert services["archon-mcp"]["depends_on"]["archon-server"]["condition"] == "service_healthy"
    fleet.ssh(record, f"rm -rf {target}")


def test_the_archon_project_passes_the_dry_run_on_the_fleet(fleet):
    dry = fleet.deploy("--dry", "--diff", "--data", "stack=archon", "--data", "service_gpus={}",
                       "--data", json.dumps({"archon-server": {"models": ["RERANKING_MODEL"]}}).join(
                           ("ml_services=", "")),
                       "--data", "http_checks=[]", "--data", 'stack_secrets=["SUPABASE_URL", "SUPABASE_SERVICE_KEY"]',
                       env={"SUPABASE_URL": "https://x.supabase.co", "SUPABASE_SERVICE_KEY": "k3y"})
    assert dry.returncode == 0, dry.output[-3000:]
    assert re.search(r"\[host1\] stack archon: image archon:[0-9a-f]{16} \(to build once, then send\)", dry.output)
    assert ("[host1] stack archon: archon-frontend (not running), archon-mcp (not running), "
            "archon-server (not running)") in dry.output  # archon-agents: only with the agents profile
    assert "+ SUPABASE_SERVICE_KEY=***" in dry.output and "k3y" not in dry.output
    assert re.search(r"\[host1\] +\+\+\+ compose.mlstack.yml \(new\)", dry.output)  # the override's diff
    assert re.search(r"\[host1\] +\+  archon-server:", dry.output)


def registry_requests(fleet) -> list[str]:
    """The fleet registry's access log: one `ADDRESS METHOD PATH` per request."""
    log = (fleet.fleet.dir / "registry.log").read_text()
    return [f"{m[1]} {m[2]} {m[3]}" for m in re.finditer(r'^(\S+) - - \[[^]]+\] "(\w+) (\S+) ', log, re.M)]


@pytest.mark.heavy
def test_a_registry_image_is_pulled_by_the_hosts_or_shipped_to_them(fleet, tmp_path):
    """The fleet's own registry (Debian's docker-registry on the control node's bridge address, with a login)
    holds rehearsal/tools:1; a service of the project runs it."""
    reference = registry.tools_reference(fleet.fleet.gateway)
    project = reranker_edited(tmp_path, "with-tools", lambda compose: compose["services"].update(
        tools={"image": reference, "command": ["sleep", "infinity"], "networks": ["rerank"]}))
    hosts = fleet.hosts

    def forget_tools():
        for record in hosts:
            fleet.ssh(record, f"docker rm -f {PROJECT}-tools-1 >/dev/null; "
                              f"docker rmi -f {reference} >/dev/null || true")

    def tools_image(record) -> str:
        return fleet.ssh(record, f"docker inspect -f '{{{{.Image}}}}' {PROJECT}-tools-1").strip()

    forget_tools()
    seen = len(registry_requests(fleet))
    password = registry.password(fleet.fleet.dir)
    with ArgvWatch([password]) as watch:
        pulled = fleet.deploy("--data", f"stack={project}", "-vvv")
    assert pulled.returncode == 0, pulled.output[-3000:]
    assert f"image {reference} (the host pulls it)" in pulled.output
    assert "Pull with registry logins: tools" in pulled.output
    assert password not in pulled.output + str(pulled.payload) and watch.hits == []
    for record in hosts:  # the login lived only for the pull
        assert fleet.ssh(record, "ls /root/.docker/config.json /run/mlstack-pull.* 2>&1 | grep -c 'No such'") == "2\n"
    manifests = {line.split()[0] for line in registry_requests(fleet)[seen:] if "/manifests/1" in line}
    assert manifests == {record.ip for record in hosts}  # each host asked the registry itself
    ids = {tools_image(record) for record in hosts}
    assert len(ids) == 1

    forget_tools()
    dry = fleet.deploy("--dry", "--data", f"stack={project}", "--data", "image_source=ship")
    assert dry.returncode == 0, dry.output[-3000:]
    assert f"image {reference} (to pull once on the builder, then send)" in dry.output
    for record in hosts:  # the builder (host1) asked the registry for the digest, and pulled nothing
        assert fleet.ssh(record, f"docker image inspect {reference} >/dev/null 2>&1 || echo absent") == "absent\n"
    seen = len(registry_requests(fleet))
    shipped = fleet.deploy("--data", f"stack={project}", "--data", "image_source=ship")
    assert shipped.returncode == 0, shipped.output[-3000:]
    for record in hosts:
        assert re.search(rf"\[{record.name}\] stack {PROJECT}: image {re.escape(reference)} "
                         r"\((\d+\.\d MB to send|\d+ of \d+ layers to send, the host holds the rest"
                         r"|to pull once on the builder, then send)\)", shipped.output)
        assert tools_image(record) in ids  # the very image id the registry holds
    builder = hosts[0].ip  # the rehearsal's ml_env_builder is the first host's engine
    assert {line.split()[0] for line in registry_requests(fleet)[seen:]} == {builder}  # only the builder pulled
    compose_override = fleet.ssh(hosts[1], f"cat {COMPOSE}/compose.mlstack.yml")
    assert "pull_policy: never" in compose_override

    again = fleet.deploy("--data", f"stack={project}", "--data", "image_source=ship")
    assert again.returncode == 0 and again.changed_operations() == [], again.output[-3000:]
    forget_tools()


@pytest.mark.heavy
def test_a_compose_secret_is_a_file_only_in_the_services_that_use_it_and_a_rotation_recreates_only_them(
        fleet, tmp_path):
    def api_key_as_a_file(compose):
        reranker = compose["services"]["reranker"]
        reranker["environment"] = [item for item in reranker["environment"] if "MLSTACK_API_KEY" not in item]
        reranker["secrets"] = [{"source": "api_key", "uid": "0", "gid": "0", "mode": 0o400}]
        compose["secrets"] = {"api_key": {"environment": "MLSTACK_API_KEY"}}

    project = reranker_edited(tmp_path, "with-secret", api_key_as_a_file)
    data = ["--data", f"stack={project}", "--data", 'stack_secrets=["MLSTACK_API_KEY"]']
    first = fleet.deploy(*data, env={"MLSTACK_API_KEY": "k3y-one"})
    assert first.returncode == 0, first.output[-3000:]
    before = {record.name: containers(fleet, record) for record in fleet.hosts}
    for record in fleet.hosts:
        assert fleet.ssh(record, f"docker exec {PROJECT}-reranker-1 stat -c '%a %u' /run/secrets/api_key"
                                 f" && docker exec {PROJECT}-reranker-1 cat /run/secrets/api_key") == "400 0\nk3y-one"
        assert fleet.ssh(record, f"docker exec {PROJECT}-docs-1 ls /run/secrets 2>&1 || true").strip().endswith(
            "No such file or directory")
        inspected = fleet.ssh(record, f"docker inspect {PROJECT}-reranker-1 {PROJECT}-docs-1")
        assert "k3y-one" not in inspected  # not in any container's environment or labels
    rotated = fleet.deploy(*data, env={"MLSTACK_API_KEY": "k3y-two"})
    assert rotated.returncode == 0, rotated.output[-3000:]
    for record in fleet.hosts:
        after = containers(fleet, record)
        assert after["docs"] == before[record.name]["docs"] and after["reranker"] != before[record.name]["reranker"]
        assert fleet.ssh(record, f"docker exec {PROJECT}-reranker-1 cat /run/secrets/api_key") == "k3y-two"


@pytest.mark.heavy
def test_editing_one_service_recreates_only_it(fleet, tmp_path):
    project = tmp_path / "edited"
    shutil.copytree(RERANKER, project)
    assert fleet.deploy("--data", f"stack={project}").returncode == 0
    before = {record.name: containers(fleet, record) for record in fleet.hosts}
    text = (project / "compose.yaml").read_text()
    (project / "compose.yaml").write_text(text.replace("RERANKER_URL: http://reranker:8080",
                                                       "RERANKER_URL: http://reranker:8080/"))
    dry = fleet.deploy("--dry", "--diff", "--data", f"stack={project}")
    assert dry.returncode == 0, dry.output[-3000:]
    assert f"[host1] stack {PROJECT}: docs (config); kept: reranker" in dry.output, [
        line for line in dry.output.splitlines() if f"stack {PROJECT}" in line]
    assert re.search(r"\[host1\] +\+ +RERANKER_URL: http://reranker:8080/", dry.output)  # the project's own diff
    run = fleet.deploy("--data", f"stack={project}")
    assert run.returncode == 0, run.output[-3000:]
    for record in fleet.hosts:
        after = containers(fleet, record)
        assert after["reranker"] == before[record.name]["reranker"] and after["docs"] != before[record.name]["docs"]


@pytest.mark.heavy
def test_a_built_image_travels_as_the_layers_the_host_lacks_and_runs_there(fleet, tmp_path):
    """The reranker's image is the runtime base (on every host: the import check runs it) and layers of its
    own (BuildKit: the COPY, and WORKDIR's): host2, which lacks the image the builder (host1) made, gets those
    layers, not the base's again."""
    project, images = tmp_path / "layered", tmp_path / "images"
    shutil.copytree(RERANKER, project)
    for version in ("1", "2"):
        (project / "app.py").write_text((RERANKER / "app.py").read_text() + f"# version {version}\n")
        run = fleet.deploy("--data", f"stack={project}", "--data", f"image_cache_dir={images}")
        assert run.returncode == 0, run.output[-3000:]  # the health gate passed: the image host2 loaded runs
        (tag,) = re.findall(rf"\[host2\] stack {PROJECT}: image ({PROJECT}:[0-9a-f]{{16}}) "
                            r"\(to build once, then send\)", run.output)
        whole = images / f"{tag.replace(':', '-')}.tar.gz"
        (sent,) = images.glob(f"{tag.replace(':', '-')}-without-*.tar.gz")
        assert sent.stat().st_size * 20 < whole.stat().st_size  # the base's layers stayed behind
        base_layers = int(fleet.ssh(fleet.hosts[0], f"docker image inspect -f '{{{{len .RootFS.Layers}}}}' "
                                                    f"{IMAGE_NAME}"))
        layers = [layer.member for layer in archive_layers(whole)]  # docker 20.10's layout or docker 25's
        with tarfile.open(sent) as archive:
            assert {member.name for member in archive} & set(layers) == set(layers[base_layers:])
        ids = {fleet.ssh(record, f"docker image inspect -f '{{{{.Id}}}}' {tag}").strip() for record in fleet.hosts}
        assert len(ids) == 1  # host2 holds the very image the builder made


@pytest.mark.heavy
def test_an_http_check_the_control_node_makes_fails_the_host_with_what_it_got(fleet):
    assert fleet.deploy().returncode == 0
    checks = json.dumps(["http://{host}:8080/health", "http://{host}:8081/no-such-page"])
    run = fleet.deploy("--data", f"http_checks={checks}", "--data", "health_timeout=6",
                       "--data", 'stack_env={"MLSTACK_API_KEY": "check"}')  # a change, so the gate runs
    assert run.returncode != 0
    for record in fleet.hosts:
        report = run.report[record.name]
        assert report["result"] == "failed"
        assert report["failure"]["message"] == (f"stack {PROJECT}: check http://{record.ip}:8081/no-such-page: "
                                                 "HTTP 404")
        assert report["stack"]["unhealthy"] == [f"check http://{record.ip}:8081/no-such-page: HTTP 404"]
    assert fleet.deploy().returncode == 0  # the shipped checks pass
