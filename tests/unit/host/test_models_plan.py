"""Model planning and the host-side commands, run here with /bin/sh on a scratch HF cache."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tasks.config import ModelSpec
from tasks.control.hub import RepoEntry, Snapshot, entries_of
from tasks.host.models import (
    ModelCacheFact,
    ModelPlan,
    RepoCacheState,
    blob_in_place_command,
    incoming_blob,
    link_target,
    plan_model,
    publish_commands,
    swarm_blobs_command,
    take_staged_command,
)
from tasks.host.programs import program
from tasks.host.transfer import RUN_MARK

COMMIT = "c0ffee" + "0" * 34
README, WEIGHTS = b"# tiny\n", os.urandom(3000)


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


TREE = json.dumps({"format_version": 1, "files": {
    "README.md": {"size": len(README), "blob_id": git_sha1(README)},
    "weights/deep/part.safetensors": {"size": 133, "blob_id": "ab" * 20,
                                      "lfs_sha256": hashlib.sha256(WEIGHTS).hexdigest(),
                                      "lfs_size": len(WEIGHTS)},
}})
SPEC = ModelSpec(repo_id="mlstack-test/nested-tiny", revision="main")


def snapshot(spec=SPEC) -> Snapshot:
    return Snapshot(spec, COMMIT, entries_of(TREE, spec), TREE)


def sh(command: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, cwd=cwd)


def test_entries_name_blobs_as_huggingface_hub_does_and_patterns_select_files():
    assert entries_of(TREE, SPEC) == (
        RepoEntry("README.md", git_sha1(README), len(README)),
        RepoEntry("weights/deep/part.safetensors", hashlib.sha256(WEIGHTS).hexdigest(), len(WEIGHTS)),
    )
    only_md = ModelSpec(repo_id="a/b", allow_patterns=["*.md"])
    assert [entry.path for entry in entries_of(TREE, only_md)] == ["README.md"]


def test_a_host_without_the_repo_gets_everything():
    plan = plan_model(snapshot(), None)
    assert [entry.path for entry in plan.send] == ["README.md", "weights/deep/part.safetensors"]
    assert (plan.write_tree, plan.publish, plan.ref, plan.bytes) == (True, True, True, len(README) + len(WEIGHTS))
    assert plan.summary() == f"model mlstack-test/nested-tiny@main ({COMMIT[:12]}): 2 file(s), 0.0 MB to transfer"


def complete_state(**changes) -> RepoCacheState:
    links = {f"{COMMIT}/{entry.path}": link_target(entry.path, entry.blob) for entry in entries_of(TREE, SPEC)}
    base = dict(blobs={git_sha1(README): len(README), hashlib.sha256(WEIGHTS).hexdigest(): len(WEIGHTS)},
                snapshots=frozenset({COMMIT}), links=links, refs={"main": COMMIT}, trees=frozenset({COMMIT}),
                hashes={}, leftovers=())
    return RepoCacheState(**{**base, **changes})


def test_a_complete_host_needs_nothing():
    plan = plan_model(snapshot(), complete_state())
    assert not plan.changes and plan.summary().endswith(": no change")


def test_a_wrong_size_or_a_wrong_hash_resends_just_that_blob():
    lfs = hashlib.sha256(WEIGHTS).hexdigest()
    assert [e.path for e in plan_model(
        snapshot(), complete_state(blobs={git_sha1(README): 1, lfs: len(WEIGHTS)})).send] == ["README.md"]
    corrupted = complete_state(hashes={lfs: "0" * 64, git_sha1(README): git_sha1(README)})
    assert [e.path for e in plan_model(snapshot(), corrupted).send] == ["weights/deep/part.safetensors"]


def test_a_published_snapshot_missing_a_file_of_the_patterns_or_with_a_wrong_link_is_relinked():
    narrow = ModelSpec(repo_id="mlstack-test/nested-tiny", allow_patterns=["*.md"])
    readme_only = complete_state(links={f"{COMMIT}/README.md": link_target("README.md", git_sha1(README))})
    assert not plan_model(snapshot(narrow), readme_only).changes
    widened = plan_model(snapshot(), readme_only)  # the same commit, all files now
    assert [entry.path for entry in widened.relink] == ["weights/deep/part.safetensors"] and not widened.publish
    diverted = complete_state(links={**complete_state().links, f"{COMMIT}/README.md": "/etc/passwd"})
    assert [entry.path for entry in plan_model(snapshot(), diverted).relink] == ["README.md"]


def test_a_moved_branch_rewrites_the_ref_and_a_sha_revision_needs_none():
    assert plan_model(snapshot(), complete_state(refs={"main": "1" * 40})).ref
    pinned = ModelSpec(repo_id="mlstack-test/nested-tiny", revision=COMMIT)
    assert not plan_model(snapshot(pinned), complete_state(refs={})).ref


def test_symlinks_are_relative_like_huggingface_hubs():
    assert link_target("README.md", "x") == "../../blobs/x"
    assert link_target("weights/deep/part.safetensors", "y") == "../../../../blobs/y"


@pytest.mark.parametrize("corrupt", [False, True])
def test_the_blob_check_places_only_the_right_content(tmp_path, corrupt):
    """files/host/place_blob.sh: a copy of the wrong size or hash is removed, never renamed into blobs/."""
    (tmp_path / "blobs").mkdir()
    readme, weights = entries_of(TREE, SPEC)
    incoming = Path(incoming_blob(str(tmp_path), weights))
    incoming.write_bytes(WEIGHTS if not corrupt else bytes(len(WEIGHTS)))
    result = sh(blob_in_place_command(str(tmp_path), weights))
    assert (result.returncode == 0) is not corrupt
    assert not incoming.exists()  # renamed, or removed when bad
    assert (tmp_path / "blobs" / weights.blob).exists() is not corrupt
    if corrupt:
        assert result.stderr == (f"model file {weights.path}: the copy does not match its size or hash; removed, "
                                 "run again\n")
    Path(incoming_blob(str(tmp_path), readme)).write_bytes(README)  # a git sha1 blob
    assert sh(blob_in_place_command(str(tmp_path), readme)).returncode == 0
    assert (tmp_path / "blobs" / readme.blob).read_bytes() == README


def test_blobs_a_swarm_fetched_are_placed_only_when_right_and_the_staging_folder_goes(tmp_path):
    """place_blob.sh --swarm: what arrived whole is placed, a wrong copy or a link is dropped, what never came is
    left to the direct path; the staging folder is removed."""
    (tmp_path / "blobs").mkdir()
    work = tmp_path / ".swarm-0badc0de"
    (work / "objects").mkdir(parents=True)
    readme, weights = entries_of(TREE, SPEC)
    (work / "objects" / readme.blob).write_bytes(README)
    (work / "objects" / weights.blob).write_bytes(bytes(len(WEIGHTS)))  # what a bad peer sent
    result = sh(swarm_blobs_command(str(work), str(tmp_path), (readme, weights)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"taken {readme.blob}", f"dropped {weights.blob}",
                                          "1 file(s), 0.0 MB, taken into the cache from the swarm; 1 dropped"]
    assert sorted(os.listdir(tmp_path / "blobs")) == [readme.blob] and not work.exists()

    (work / "objects").mkdir(parents=True)
    (tmp_path / "elsewhere").write_bytes(WEIGHTS)  # the right content, behind a link
    (work / "objects" / weights.blob).symlink_to(tmp_path / "elsewhere")
    result = sh(swarm_blobs_command(str(work), str(tmp_path), (weights,)))
    assert result.stdout.splitlines() == [f"dropped {weights.blob}",
                                          "0 file(s), 0.0 MB, taken into the cache from the swarm; 1 dropped"]
    assert sorted(os.listdir(tmp_path / "blobs")) == [readme.blob] and not work.exists()


def test_the_blob_check_reads_no_link(tmp_path):
    (tmp_path / "blobs").mkdir()
    readme = entries_of(TREE, SPEC)[0]
    (tmp_path / "elsewhere").write_bytes(README)  # the right content, behind a link
    incoming = Path(incoming_blob(str(tmp_path), readme))
    incoming.symlink_to(tmp_path / "elsewhere")
    assert sh(blob_in_place_command(str(tmp_path), readme)).returncode == 1
    assert not incoming.is_symlink() and not (tmp_path / "blobs" / readme.blob).exists()
    assert (tmp_path / "elsewhere").read_bytes() == README


def staged_download(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A scratch cache with a staging cache as a host download leaves it: the snapshot path NAME links to its
    blob; (repo, staging, snapshot)."""
    repo, staging = tmp_path / "cache" / "hub" / SPEC.folder, tmp_path / "cache" / ".staging-x"
    (repo / "blobs").mkdir(parents=True)
    snapshot = staging / "hub" / SPEC.folder / "snapshots" / COMMIT
    (snapshot / name).parent.mkdir(parents=True)
    (staging / "hub" / SPEC.folder / "blobs").mkdir()
    return repo, staging, snapshot


def test_a_host_downloaded_blob_moves_from_the_staging_cache_to_its_incoming_name(tmp_path):
    """files/host/take_staged.sh: the blob behind the snapshot link is moved, whatever its path holds."""
    readme = entries_of(TREE, SPEC)[0]
    weights = RepoEntry("it's $(x) a \"file\".bin", entries_of(TREE, SPEC)[1].blob, len(WEIGHTS))
    repo, staging, snapshot = staged_download(tmp_path, weights.path)
    for entry, data in ((readme, README), (weights, WEIGHTS)):
        blob = staging / "hub" / SPEC.folder / "blobs" / entry.blob
        blob.write_bytes(data)
        (snapshot / entry.path).symlink_to(os.path.relpath(blob, (snapshot / entry.path).parent))
        result = sh(f"{take_staged_command(str(staging), str(snapshot), str(repo), entry)} "
                    f"&& {blob_in_place_command(str(repo), entry)}")
        assert result.returncode == 0, result.stderr
        assert (repo / "blobs" / entry.blob).read_bytes() == data and not blob.exists()


def test_a_staged_link_leading_out_of_the_staging_cache_is_not_followed(tmp_path):
    readme = entries_of(TREE, SPEC)[0]
    repo, staging, snapshot = staged_download(tmp_path, readme.path)
    (tmp_path / "elsewhere").write_bytes(README)  # the right content, outside the staging cache
    (snapshot / readme.path).symlink_to(tmp_path / "elsewhere")
    result = sh(take_staged_command(str(staging), str(snapshot), str(repo), readme))
    assert result.returncode == 1
    assert result.stderr == (f"model file {snapshot / readme.path}: the download left no file of its own in "
                             f"{staging}\n")
    assert (tmp_path / "elsewhere").read_bytes() == README and not Path(incoming_blob(str(repo), readme)).exists()


def test_the_commands_run_the_host_programs_with_each_value_quoted():
    plan = ModelPlan(snapshot(), (), False, True, (), True, ("blobs/x.incoming-1",))
    commands = publish_commands("/srv/hf/hub/models--a--b", plan, (0, 0))
    assert commands[0] == program("publish_snapshot.sh", "leftovers", "/srv/hf/hub/models--a--b",
                                  "blobs/x.incoming-1")
    assert commands[1] == program("publish_snapshot.sh", "snapshot", "/srv/hf/hub/models--a--b", COMMIT, RUN_MARK,
                                  "README.md", f"../../blobs/{git_sha1(README)}", "weights/deep/part.safetensors",
                                  f"../../../../blobs/{entries_of(TREE, SPEC)[1].blob}")
    assert commands[2] == program("publish_snapshot.sh", "ref", "/srv/hf/hub/models--a--b", "main", COMMIT)
    readme = entries_of(TREE, SPEC)[0]
    assert blob_in_place_command("/r", readme) == program(
        "place_blob.sh", f"/r/blobs/{readme.blob}.incoming-{RUN_MARK}", f"/r/blobs/{readme.blob}", len(README),
        readme.blob, "README.md")


def test_published_layout_loads_offline_with_huggingface_hub(tmp_path):
    """The commands build a cache that huggingface_hub itself accepts offline (what the stack will do)."""
    repo = tmp_path / "hub" / SPEC.folder
    (repo / "blobs").mkdir(parents=True)
    (repo / "trees").mkdir()
    for entry, data in zip(entries_of(TREE, SPEC), (README, WEIGHTS), strict=True):
        (repo / "blobs" / entry.blob).write_bytes(data)
    (repo / "trees" / f"{COMMIT}.json").write_text(TREE)
    plan = ModelPlan(snapshot(), (), False, True, (), True, ("blobs/deadbeef.incoming",))
    (repo / "blobs" / "deadbeef.incoming").write_bytes(b"partial")
    for command in publish_commands(str(repo), plan, (os.getuid(), os.getgid())):
        result = sh(command)
        assert result.returncode == 0, result.stderr
    assert not (repo / "blobs" / "deadbeef.incoming").exists()
    assert (repo / "refs" / "main").read_text() == COMMIT
    assert os.readlink(repo / "snapshots" / COMMIT / "weights/deep/part.safetensors").startswith("../../../../blobs/")
    script = ("from huggingface_hub import snapshot_download; import sys; "
              f"print(snapshot_download('{SPEC.repo_id}', revision=sys.argv[1], cache_dir='{tmp_path / 'hub'}'))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for revision in (COMMIT, "main"):
        result = subprocess.run([os.sys.executable, "-c", script, revision], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(repo / "snapshots" / COMMIT)
    assert (repo / "snapshots" / COMMIT / "weights/deep/part.safetensors").read_bytes() == WEIGHTS
    # one link lost, one diverted: relinked in place
    (repo / "snapshots" / COMMIT / "weights/deep/part.safetensors").unlink()
    (repo / "snapshots" / COMMIT / "README.md").unlink()
    (repo / "snapshots" / COMMIT / "README.md").symlink_to("/etc/hostname")
    relink = ModelPlan(snapshot(), (), False, False, entries_of(TREE, SPEC), False, ())
    for command in publish_commands(str(repo), relink, (os.getuid(), os.getgid())):
        assert sh(command).returncode == 0
    assert (repo / "snapshots" / COMMIT / "weights/deep/part.safetensors").read_bytes() == WEIGHTS
    assert (repo / "snapshots" / COMMIT / "README.md").read_bytes() == README


def test_the_fact_reads_blobs_snapshots_refs_trees_hashes_and_leftovers():
    incoming = f"{'ab' * 20}.incoming-0123abcd"
    lines = ["free 4", f"repo {SPEC.folder}", f"blob 7 {git_sha1(README)}", f"blob 5 {incoming}",
             f"snapshot d {COMMIT}", f"snapshot d {COMMIT}.tmp", f"link ../../blobs/x {COMMIT}/README.md",
             f"link /etc {COMMIT}.tmp/a", f"snapshot l {'9' * 40}", f"tree {COMMIT}.json", f"ref main {COMMIT}",
             f"hash {git_sha1(README)} {git_sha1(README)}"]
    state = ModelCacheFact().process(lines)
    assert state.free_bytes == 4096
    assert state.repos[SPEC.folder] == RepoCacheState(
        {git_sha1(README): 7}, frozenset({COMMIT}), {f"{COMMIT}/README.md": "../../blobs/x"}, {"main": COMMIT},
        frozenset({COMMIT}),
        {git_sha1(README): git_sha1(README)}, (f"blobs/{incoming}", f"snapshots/{'9' * 40}", f"snapshots/{COMMIT}.tmp"))


def test_records_of_any_other_shape_are_ignored_so_nothing_planted_is_used_or_removed():
    lines = ["free 4", "free 99999999", f"repo {SPEC.folder}", "blob 5 abc.incoming", "blob x " + "ab" * 20,
             "snapshot d ../../../../etc", "snapshot d ..", f"snapshot {COMMIT}", f"ref main {COMMIT}extra",
             "ref ../../x " + COMMIT,
             f"hash {'ab' * 20} $(reboot)", "repo models--not--asked", f"blob 1 {'cd' * 20}"]
    command = ModelCacheFact()
    command.command("/srv/cache", (SPEC.folder,))
    state = command.process(lines)
    assert state.free_bytes == 4096 and list(state.repos) == [SPEC.folder]
    assert state.repos[SPEC.folder] == RepoCacheState({}, frozenset(), {}, {}, frozenset(), {}, ())


def test_the_fact_command_reports_a_scratch_cache_and_finds_a_corrupted_blob(tmp_path):
    repo = tmp_path / "hub" / SPEC.folder
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    readme_blob, weights_blob = git_sha1(README), hashlib.sha256(WEIGHTS).hexdigest()
    (repo / "blobs" / readme_blob).write_bytes(README)
    (repo / "blobs" / weights_blob).write_bytes(bytes(len(WEIGHTS)))  # same size, wrong content
    (repo / "refs" / "main").write_text(COMMIT)
    command = ModelCacheFact().command(str(tmp_path), (SPEC.folder, "models--not--there"), hashes=True)
    result = sh(command)
    assert result.returncode == 0, result.stderr
    state = ModelCacheFact().process(result.stdout.splitlines())
    repo_state = state.repos[SPEC.folder]
    assert list(state.repos) == [SPEC.folder] and state.free_bytes > 0
    assert repo_state.refs == {"main": COMMIT}
    assert repo_state.hashes == {readme_blob: readme_blob,
                                 weights_blob: hashlib.sha256(bytes(len(WEIGHTS))).hexdigest()}
    assert [entry.path for entry in plan_model(snapshot(), repo_state).send] == ["weights/deep/part.safetensors"]


def test_the_probe_reads_a_hostile_cache_without_hanging_following_links_or_forging_records(tmp_path):
    repo = tmp_path / "hub" / SPEC.folder
    for sub in ("blobs", "snapshots", "refs"):
        (repo / sub).mkdir(parents=True)
    os.mkfifo(repo / "blobs" / ("ee" * 20))  # a FIFO where a blob belongs: reading it would block forever
    (repo / "blobs" / ("ff" * 32)).symlink_to("/etc/passwd")  # a link where a blob belongs
    (repo / "blobs" / f"{'aa' * 20}\nsnapshot ..").write_text("x")  # a name that would be a second record
    (repo / "snapshots" / f"{COMMIT}\nref main {'0' * 40}").mkdir()
    (repo / "refs" / "main").write_text(f"{COMMIT}\nrepo {SPEC.folder}\nblob 1 {'bb' * 20}\n")  # content as records
    (repo / "refs" / "v1").write_text(COMMIT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ("cc" * 32)).write_text("not the cache's")
    linked = tmp_path / "hub" / "models--org--linked"
    linked.mkdir()
    (linked / "blobs").symlink_to(elsewhere)  # a folder of ours made a link: not entered
    command = ModelCacheFact().command(str(tmp_path), (SPEC.folder, "models--org--linked"), hashes=True)
    result = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert not any("\n" in name for name in os.listdir(repo / "refs"))
    state = ModelCacheFact().process(result.stdout.splitlines()).repos[SPEC.folder]
    assert state.blobs == {} and state.hashes == {} and state.snapshots == frozenset()
    assert state.refs == {"v1": COMMIT} and state.leftovers == ()
    linked_state = ModelCacheFact().process(result.stdout.splitlines()).repos["models--org--linked"]
    assert linked_state.blobs == {} and linked_state.hashes == {}


def test_a_blob_the_host_did_not_hash_when_asked_is_of_unknown_content_and_sent_again():
    """Issue 26: a hash line the probe lost counted as a good hash, so a damaged blob was never repaired."""
    lfs = hashlib.sha256(WEIGHTS).hexdigest()
    lost = complete_state(hashes={git_sha1(README): git_sha1(README)}, hashed=True)
    assert [e.path for e in plan_model(snapshot(), lost).send] == ["weights/deep/part.safetensors"]
    assert not plan_model(snapshot(), complete_state(hashes={git_sha1(README): git_sha1(README)})).changes  # not asked
    asked = ModelCacheFact()
    asked.command("/srv/cache", (SPEC.folder,), hashes=True)
    assert asked.process([f"repo {SPEC.folder}", f"blob 5 {lfs}"]).repos[SPEC.folder].hashed
