"""The pure part of a `build:` service's build (tasks/control/stack_project.py): the ignore file docker reads and
its patterns, the paths that name the image (its tag), and what a failed build says. The build itself is
`docker compose build` on a real engine: tests/integration/test_builds.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.control import stack_project
from tasks.control.compose_project import Build, ComposeProject
from tasks.control.stack_project import (
    build_failure,
    context_paths,
    frontend_image,
    ignore_file,
    ignore_patterns,
    image_tag,
    remembered_tag,
)

RERANKER = Path(__file__).parents[3] / "files/stacks/reranker"


def build_of(context: Path, dockerfile: str = "Dockerfile", **spec) -> Build:
    whole = {"context": str(context), "dockerfile": dockerfile, **spec}
    if "dockerfile_inline" in spec:
        whole.pop("dockerfile")
    return Build("api", context, dockerfile, spec.get("args", {}), None, None, json.dumps(whole, sort_keys=True))


def tag_of(build: Build) -> str:
    project = ComposeProject(build.context, ("compose.yaml",), "proj", {})
    return image_tag(project, build, "sha256:base")


@pytest.mark.parametrize(("text", "patterns"), [
    ("./secrets.env\n*.[pP][eE][mM]\n", ["secrets.env", "*.[pP][eE][mM]"]),  # cleaned; classes kept as written
    ("/build/\n!./keep/../keep.txt\n  spaced  \n", ["build", "!keep.txt", "spaced"]),
    ("# a comment\n\n \t\n #not a comment\n", ["#not a comment"]),  # only a line that starts with # is one
    ("\ufeffa\n//b\n/\n", ["a", "b", "/"]),
])
def test_ignore_patterns_as_docker_reads_them(text, patterns):
    assert ignore_patterns(text) == patterns


def make_context(root: Path, outside: Path) -> None:
    files = {"Dockerfile": "FROM x\nCOPY . /app/\n", ".dockerignore": "./secrets.env\n*.[pP][eE][mM]\n",
             "app.py": "print()\n", "secrets.env": "TOKEN=1\n", "key.pem": "k", "sub/KEY.Pem": "k",
             "sub/data.txt": "d"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    outside.write_text("the control node's key\n")
    (root / "deploy_key").symlink_to(os.path.relpath(outside, root))
    (root / "linked").symlink_to(outside.parent, target_is_directory=True)


def test_the_paths_docker_keeps_name_the_image_and_links_are_never_followed(tmp_path):
    context, outside = tmp_path / "app", tmp_path / "home/op/id_ed25519"
    context.mkdir()
    outside.parent.mkdir(parents=True)
    make_context(context, outside)
    assert context_paths(context, ignore_patterns((context / ".dockerignore").read_text())) == [
        ".dockerignore", "Dockerfile", "app.py", "deploy_key", "linked", "sub", "sub/KEY.Pem",  # `*`: the root only
        "sub/data.txt"]
    tag = tag_of(build_of(context))
    assert tag.startswith("proj:") and len(tag) == len("proj:") + 16
    for ignored in ("secrets.env", "key.pem"):
        (context / ignored).write_text("changed")
    outside.write_text("another key\n")  # what a link names is not the image's
    assert tag_of(build_of(context)) == tag
    (context / "sub/KEY.Pem").write_text("changed")
    assert tag_of(build_of(context)) != tag
    tag = tag_of(build_of(context))
    (context / "deploy_key").unlink()
    (context / "deploy_key").symlink_to("elsewhere")
    assert tag_of(build_of(context)) != tag
    tag = tag_of(build_of(context))
    (context / "app.py").chmod(0o755)
    assert tag_of(build_of(context)) != tag


def test_the_dockerfiles_own_ignore_file_replaces_the_contexts(tmp_path):
    make_context(tmp_path, tmp_path.parent / f"{tmp_path.name}-outside")
    (tmp_path / "api.Dockerfile").write_text("FROM x\n")
    (tmp_path / "api.Dockerfile.dockerignore").write_text("app.py\n")
    assert ignore_file(build_of(tmp_path, "api.Dockerfile")) == tmp_path / "api.Dockerfile.dockerignore"
    assert ignore_file(build_of(tmp_path)) == tmp_path / ".dockerignore"
    tag = tag_of(build_of(tmp_path, "api.Dockerfile"))
    (tmp_path / "app.py").write_text("print(2)\n")
    assert tag_of(build_of(tmp_path, "api.Dockerfile")) == tag
    (tmp_path / "secrets.env").write_text("TOKEN=2\n")  # .dockerignore no longer applies
    assert tag_of(build_of(tmp_path, "api.Dockerfile")) != tag


def test_the_build_section_names_the_image_but_never_a_secrets_value(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    plain = tag_of(build_of(tmp_path))
    assert tag_of(build_of(tmp_path, args={"A": "1"})) != plain
    assert tag_of(build_of(tmp_path, dockerfile_inline="FROM y\n")) != plain
    with_secret = tag_of(build_of(tmp_path, secrets=[{"source": "token"}]))
    assert with_secret != plain  # the secret's name only: its value is nowhere in the section
    extra = tmp_path.parent / f"{tmp_path.name}-extra"
    extra.mkdir()
    (extra / "e.txt").write_text("1")
    named = tag_of(build_of(tmp_path, additional_contexts={"more": str(extra)}))
    (extra / "e.txt").write_text("2")
    assert tag_of(build_of(tmp_path, additional_contexts={"more": str(extra)})) != named


def test_the_reranker_image_does_not_depend_on_its_compose_file(tmp_path):
    project = tmp_path / "reranker"
    project.mkdir()
    for path in RERANKER.iterdir():
        (project / path.name).write_bytes(path.read_bytes())
    tag = tag_of(build_of(project, "Dockerfile.server"))
    (project / "compose.yaml").write_text("services: {}\n")
    assert tag_of(build_of(project, "Dockerfile.server")) == tag


@pytest.mark.parametrize(("dockerfile", "args", "frontend"), [
    ("# syntax=registry.corp/dockerfile:1.7\nFROM x\n", {}, "registry.corp/dockerfile:1.7"),
    ("#syntax = docker/dockerfile:1\n# escape=`\nFROM x\n", {}, "docker/dockerfile:1"),
    ("# escape=\\\n#  SYNTAX=b:1\nFROM x\n", {}, "b:1"),
    ("\n# syntax=a:1\nFROM x\n", {}, None),  # after a blank line it is a comment
    ("FROM x\n# syntax=a:1\n", {}, None),
    ("FROM x\n", {"BUILDKIT_SYNTAX": "c:1"}, "c:1"),
])
def test_the_frontend_image_a_dockerfile_names(tmp_path, dockerfile, args, frontend):
    (tmp_path / "Dockerfile").write_text(dockerfile)
    assert frontend_image(build_of(tmp_path, args=args)) == frontend


def test_what_the_builders_engine_lacks_is_named_with_the_service(tmp_path):
    """Outputs as compose 2.26 printed them against docker 20.10.24's BuildKit."""
    (tmp_path / "Dockerfile").write_text("FROM x\nRUN --mount=type=cache,target=/c true\n  copy --link . /app/\n")
    build = build_of(tmp_path)
    output = ("#2 DONE 0.0s\nfailed to solve: rpc error: code = Unknown desc = failed to solve with frontend "
              "dockerfile.v0: failed to create LLB definition: dockerfile parse error line 3: Unknown flag: link\n")
    message = build_failure(build, "unix:///b.sock", output)
    assert message.startswith("service api: its Dockerfile uses `COPY --link` (line 3), which the Dockerfile "
                              "frontend of ml_env_builder 'unix:///b.sock' does not support")
    output = ("failed to solve: rpc error: code = Unknown desc = failed to solve with frontend dockerfile.v0: "
              "unsupported frontend capability moby.buildkit.frontend.contexts")
    assert build_failure(build, "", output).startswith(
        "service api: its build uses build.additional_contexts (named build contexts), which the BuildKit of "
        "the control node's docker engine (ml_env_builder '') does not support")
    output = "#6 ERROR: executor failed running [/bin/sh -c true]: network bridge not found\n"
    assert "set `build.network: none` (or `host`) for the service" in build_failure(build, "", output)
    assert build_failure(build, "", "x\nfailed to solve: something else\n") == (
        "service api: the build failed on the control node's docker engine (ml_env_builder ''): "
        "failed to solve: something else")


def test_a_frontend_image_that_cannot_be_fetched_is_named(tmp_path):
    (tmp_path / "Dockerfile").write_text("# syntax=10.213.9.1:5000/dockerfile:1.7\nFROM x\n")
    output = (" > [api] resolve image config for 10.213.9.1:5000/dockerfile:1.7:\n------\nfailed to solve: rpc "
              "error: code = Unknown desc = failed to solve with frontend dockerfile.v0: failed to solve with "
              "frontend gateway.v0: 10.213.9.1:5000/dockerfile:1.7: not found\n")
    message = build_failure(build_of(tmp_path), "", output)
    assert message.startswith("service api: its Dockerfile names the frontend image 10.213.9.1:5000/dockerfile:1.7 "
                              "(`# syntax=`), which BuildKit on the control node's docker engine (ml_env_builder "
                              "'') must fetch from its registry, and that failed: failed to solve:")


def test_a_remembered_tag_is_the_tag_and_any_write_to_the_context_makes_a_new_key(tmp_path, monkeypatch):
    monkeypatch.setattr(stack_project, "RACY_NS", 0)  # remembered however recent the writes below
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\n")
    (context / "app.py").write_text("print(1)\n")
    build, cache = build_of(context), tmp_path / "cache"
    cache.mkdir()
    project = ComposeProject(build.context, ("compose.yaml",), "proj", {})
    assert remembered_tag(cache, project, build, "sha256:base") == tag_of(build)
    assert list(json.loads((cache / "image-tags.json").read_text()).values()) == [tag_of(build)]
    before, first = (context / "app.py").stat(), tag_of(build)
    (context / "app.py").write_text("print(2)\n")  # same size, its times put back: only its ctime tells
    os.utime(context / "app.py", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert remembered_tag(cache, project, build, "sha256:base") == tag_of(build) != first
    assert len(json.loads((cache / "image-tags.json").read_text())) == 2
    assert remembered_tag(cache, project, build, "sha256:other") == image_tag(project, build, "sha256:other")


def test_a_context_written_within_the_last_two_seconds_is_hashed_and_not_remembered(tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\n")
    build = build_of(context)
    project = ComposeProject(build.context, ("compose.yaml",), "proj", {})
    assert remembered_tag(tmp_path, project, build, "sha256:base") == tag_of(build)
    assert not (tmp_path / "image-tags.json").exists()


def test_an_unchanged_context_is_not_read_again_nor_the_docker_sdk_imported(tmp_path):
    """The no-op's part: a second deploy (a new process) finds the tag in the memo by a stat walk alone."""
    build, cache = build_of(RERANKER, "Dockerfile.server"), tmp_path
    program = ("import json, sys; from pathlib import Path; from tasks.control.compose_project import *; "
               "from tasks.control.stack_project import remembered_tag; "
               f"build = Build(**json.loads(sys.argv[1]) | {{'context': Path({str(RERANKER)!r})}}); "
               f"print(remembered_tag(Path({str(cache)!r}), ComposeProject(build.context, (), 'proj', {{}}), build, "
               "'sha256:base'), 'docker' in sys.modules)")
    fields = {"service": build.service, "dockerfile": build.dockerfile, "args": build.args, "target": None,
              "network": None, "spec": build.spec}
    runs = [subprocess.run([sys.executable, "-c", program, json.dumps(fields)], capture_output=True, text=True,
                           check=True, cwd=Path(__file__).parents[3]).stdout.split() for _ in range(2)]
    assert runs == [[tag_of(build), "True"], [tag_of(build), "False"]]
