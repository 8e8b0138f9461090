"""The compose project as data: what the deploy injects, what it escapes, what it leaves to the stack."""

import runpy
from pathlib import Path

import pytest
import yaml

from tasks.config import ModelSpec, validate_host
from tasks.control.builder import BaseImage
from tasks.control.hub import Snapshot
from tasks.control.stack_project import StackDef
from tasks.host.gpu_checks import Gpu, GpuRequestError
from tasks.host.ml_env import EnvPlan
from tasks.host.stack import ContainerState, StackState, dotenv_line, escape, masked_env_diff, plan_stack, render

DEFAULTS = {k: v for k, v in runpy.run_path(str(Path(__file__).parents[3] / "inventory/group_data/all.py")).items()
            if not k.startswith("_")}
BASE = BaseImage("python:3.11-slim-bookworm", "sha256:base", "python3.11", "linux/amd64")
QWEN = "Qwen/Qwen3-Reranker-0.6B"
COMMIT = "a" * 40
GPUS = [Gpu(0, "GPU-5a7f8c3e-1b2d-4e6f-9a8b-0c1d2e3f4a5b", "NVIDIA A100-SXM4-80GB", 81920, "535.183.01")]


def rendered(stack="archon", gpus=(), **overrides):
    config, problems = validate_host("gpu-01", {**DEFAULTS, "stack": stack, **overrides})
    assert problems == []
    env = EnvPlan("env-0123456789abcdef", None, False, False, (), BASE)
    snapshots = [Snapshot(ModelSpec(repo_id=QWEN), COMMIT, (), "{}")]
    return config, render(StackDef.load(stack), config, env, snapshots, "mlstack-archon:0123", list(gpus),
                          {"SUPABASE_URL": "https://x.supabase.co", "SUPABASE_SERVICE_KEY": "k$y"})


def test_archon_services_get_the_env_the_model_and_gpus_only_where_they_mount_them():
    _, out = rendered(gpus=GPUS, ml_env_dir="/srv/ml-env_1")
    services = yaml.safe_load(out.compose)["services"]
    server = services["archon-server"]
    assert server["image"] == "mlstack-archon:0123" and server["network_mode"] == "host"
    assert {"type": "bind", "source": "/srv/ml-env_1/envs/env-0123456789abcdef", "target": "/root/.local",
            "read_only": True} in server["volumes"]
    assert server["environment"]["PYTHONPATH"] == "/root/.local/lib/python3.11/site-packages"
    assert ((server["environment"]["RERANKING_MODEL"], server["environment"]["RERANKING_MODEL_REVISION"])
            == (QWEN, COMMIT))
    assert server["environment"]["HF_HUB_OFFLINE"] == "1"
    assert server["labels"]["mlstack.env-id"] == "env-0123456789abcdef"
    assert server["labels"]["mlstack.models"] == f"{QWEN}@{COMMIT}"
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [GPUS[0].uuid]
    assert "volumes" not in services["archon-mcp"] and "deploy" not in services["archon-mcp"]
    assert services["archon-ui"]["image"] == "${ARCHON_UI_IMAGE:-archon-ui:latest}"  # the stack's own compose syntax
    assert services["archon-agents"]["profiles"] == ["agents"]
    assert "k$y" not in out.compose and "supabase.co" not in out.compose  # secrets only in .env
    assert out.dotenv == 'SUPABASE_URL="https://x.supabase.co"\nSUPABASE_SERVICE_KEY="k\\$y"\n'


EIGHT = [Gpu(i, f"GPU-5a7f8c3e-1b2d-4e6f-9a8b-0c1d2e3f4a{i:02x}", "NVIDIA H100 80GB HBM3", 81559, "580.159.04", "9.0")
         for i in range(8)]


def reservation(out, service) -> list[str] | None:
    spec = yaml.safe_load(out.compose)["services"][service]
    return spec["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] if "deploy" in spec else None


def test_each_service_gets_the_gpus_assigned_to_it_by_uuid_and_the_others_none():
    _, out = rendered(gpus=EIGHT, service_gpus={"archon-server": [6, 7], "archon-mcp": 2, "archon-agents": "all"},
                      stack_profiles=["agents"])
    assert reservation(out, "archon-server") == [EIGHT[6].uuid, EIGHT[7].uuid]
    assert reservation(out, "archon-mcp") == [EIGHT[0].uuid, EIGHT[1].uuid]
    assert reservation(out, "archon-agents") == [gpu.uuid for gpu in EIGHT]
    assert reservation(out, "archon-ui") is None  # not assigned: no GPU
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
    assert "deploy" not in yaml.safe_load(out.compose)["services"]["archon-server"]


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
                           service_gpus={})
    labels = out.labels["reranker"]
    running = {
        "reranker": ContainerState("running", "healthy",
                                   {**labels, "mlstack.config": "old", "mlstack.env-id": "env-old"}),
        "docs": ContainerState("running", "healthy", out.labels["docs"]),
    }
    state = StackState({"tag": "sha256:img"}, running, out.compose, out.digest)
    plan = plan_stack(state, out, "tag", [], StackDef.load("reranker"))
    assert plan.recreate == {"reranker": "env id env-old → env-0123456789abcdef"} and not plan.push
    # docker reads a label a container lacks as "": the docs service (no env, no model) changed its config only.
    as_docker_reads = {"mlstack.env-id": "", "mlstack.models": "", **out.labels["docs"], "mlstack.config": "old"}
    docs = ContainerState("running", "healthy", as_docker_reads)
    edited = StackState({"tag": "sha256:img"}, {**running, "docs": docs}, out.compose, out.digest)
    assert plan_stack(edited, out, "tag", [], StackDef.load("reranker")).recreate["docs"] == "config"
    stopped = StackState({"tag": "sha256:img"}, {"docs": ContainerState("exited", "", out.labels["docs"])}, None, None)
    assert (plan_stack(stopped, out, "tag", [], StackDef.load("reranker")).recreate
            == {"reranker": "not running", "docs": "exited"})
