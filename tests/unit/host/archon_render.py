"""A full render of the Archon example (inventory/example_archon.py) with a fixed env, model, GPU and salt:
the render unit tests' fixture, and the fleet test that runs docker compose on what it renders."""

import runpy
from pathlib import Path

from tasks.config import ModelSpec
from tasks.control.builder import BaseImage
from tasks.control.compose_project import project_of
from tasks.control.hub import Snapshot
from tasks.host.gpu_checks import Gpu
from tasks.host.ml_env import EnvPlan
from tasks.host.stack_images import ServiceImage
from tasks.host.stack_render import render
from tasks.validation import validate_host

EXAMPLE = runpy.run_path(str(Path(__file__).parents[3] / "inventory/example_archon.py"))["archon_hosts"][1]
DEFAULTS = {key: value for key, value in EXAMPLE.items() if not key.startswith(("_", "ssh_"))}  # no connection data
BASE = BaseImage("python:3.11-slim-bookworm", "sha256:base", "python3.11", "linux/amd64")
QWEN = "Qwen/Qwen3-Reranker-0.6B"
COMMIT = "a" * 40
GPUS = [Gpu(0, "GPU-5a7f8c3e-1b2d-4e6f-9a8b-0c1d2e3f4a5b", "NVIDIA A100-SXM4-80GB", 81920, "535.183.01")]
SECRETS = {"SUPABASE_URL": "https://x.supabase.co", "SUPABASE_SERVICE_KEY": "k$y"}
SALT = "5a17" * 8


def rendered(stack="archon", gpus=(), salt=SALT, **overrides):
    config, problems = validate_host("gpu-01", {**DEFAULTS, "stack": stack, **overrides})
    assert problems == []
    env = EnvPlan("env-0123456789abcdef", None, False, False, (), BASE)
    snapshots = [Snapshot(ModelSpec(repo_id=QWEN), COMMIT, (), "{}")]
    project = project_of(config)
    images = {name: ServiceImage(f"{project.name}:0123") for name, spec in project.services.items() if "build" in spec}
    return config, render(project, config, env, snapshots, images, list(gpus), SECRETS, salt)
