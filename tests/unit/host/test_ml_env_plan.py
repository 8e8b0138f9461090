"""ML env planning from the host fact: upload, switch, keep, clean — pure logic, no host."""


import pytest

from tasks.control.builder import BaseImage
from tasks.host.ml_env import MlEnvFact, MlEnvState, plan_env

A, B, C, D = (f"env-{digit * 16}" for digit in "abcd")
BASE = BaseImage("python:3.11-slim-bookworm", "sha256:img", "python3.11", "linux/amd64")


def state(active=None, envs=None, leftovers=()):
    return MlEnvState(active, envs or {}, tuple(leftovers), 10**12, "x86_64", "sha256:img")


def test_the_fact_reports_only_names_this_deploy_writes():
    output = [
        "free 1048576", "arch x86_64", f"image sha256:{'ab' * 32}",
        f"active envs/{B}",
        f"entry 100 envs/{A}", f"entry 200 envs/{B}", f"entry 300 envs/{C}.tmp",
        f"entry 400 incoming/{D}.tar.gz", "entry 500 envs/notes.txt", "entry 600 envs/env-XYZ",
        f"entry 700 envs/{C}.tmp-0123abcd", f"entry 800 incoming/{D}.tar.gz-0123abcd", f"entry 900 envs/{C}.tmp-x",
        "entry 950 incoming/0badc0de", "entry 960 incoming/0badc0de0", f"stored envs/{B}", f"stored envs/{C}.tmp",
        f"damaged {'e' * 64}-644", "damaged ../../etc/passwd", f"damaged {'f' * 64}-644",
    ]
    assert MlEnvFact().process(output) == MlEnvState(
        active=B, envs={A: 100, B: 200},
        leftovers=(f"envs/{C}.tmp", f"envs/{C}.tmp-0123abcd", "incoming/0badc0de", f"incoming/{D}.tar.gz",
                   f"incoming/{D}.tar.gz-0123abcd"),
        free_bytes=1024**3, arch="x86_64", image_id=f"sha256:{'ab' * 32}",
        stored=frozenset({B}), damaged=(f"{'e' * 64}-644", f"{'f' * 64}-644"),
    )


def test_an_env_a_container_of_another_project_mounts_is_never_removed():
    output = ["free 1", f"active envs/{D}", f"entry 1 envs/{A}", f"entry 2 envs/{B}", f"entry 3 envs/{C}",
              f"entry 4 envs/{D}", f"entry 5 envs/{C}.tmp-0123abcd", f"mounted envs/{A} theirs",
              f"mounted envs/{C}.tmp-0123abcd ", f"mounted envs/{B} ours", "mounted envs/../../etc x",
              "mounted /srv/other"]
    state = MlEnvFact().process(output)
    assert state.mounted == {(f"envs/{A}", "theirs"), (f"envs/{C}.tmp-0123abcd", ""), (f"envs/{B}", "ours")}
    # B is mounted by the stack's own containers, which the run switches to D before the cleanup
    assert plan_env(state, D, keep_envs=0, base=BASE, project="ours").remove == (f"envs/{C}", f"envs/{B}")


def test_lines_a_planted_name_could_add_change_nothing():
    output = ["free 1048576", "arch x86_64", "image sha256:abc", f"active envs/{B}", f"entry 100 envs/{B}",
              "free 999999999", f"active envs/{A}", f"entry x envs/{A}", "entry 1 envs/../../etc"]
    state = MlEnvFact().process(output)
    assert (state.free_bytes, state.active, state.envs, state.leftovers, state.image_id) == (
        1024**3, B, {B: 100}, (), None)


def test_a_host_with_nothing_reports_no_env_and_no_image():
    assert MlEnvFact().process(["free 2048", "arch aarch64", "image "]) == MlEnvState(
        None, {}, (), 2 * 1024**2, "aarch64", None)


def test_an_active_link_to_an_unfinished_unpack_is_not_an_active_env():
    assert MlEnvFact().process([f"active envs/{A}.tmp", "free 1"]).active is None


def test_a_new_env_is_uploaded_and_switched_to_and_the_old_one_is_kept():
    plan = plan_env(state(active=A, envs={A: 100}), B, keep_envs=2, base=BASE, project="ours")
    assert (plan.upload, plan.activate, plan.remove, plan.current) == (True, True, (), A)
    assert plan.summary(46_100_000) == f"ML env: {A} → {B} (46.1 MB to upload)"


def test_nothing_to_do_when_the_wanted_env_is_active():
    plan = plan_env(state(active=B, envs={A: 100, B: 200}), B, keep_envs=2, base=BASE, project="ours")
    assert (plan.upload, plan.activate, plan.remove) == (False, False, ())
    assert plan.summary(0) == f"ML env: {B} (no change)"


def test_keep_envs_counts_previous_envs_newest_first_and_the_one_switched_away_from_is_newest():
    # C is active but oldest by mtime (it was pinned long ago); switching to D makes C the newest previous.
    plan = plan_env(state(active=C, envs={A: 300, B: 200, C: 100}), D, keep_envs=1, base=BASE, project="ours")
    assert plan.remove == (f"envs/{A}", f"envs/{B}")
    assert plan_env(state(active=C, envs={A: 300, B: 200, C: 100}), D, keep_envs=0, base=BASE,
                    project="ours").remove == (
        f"envs/{C}", f"envs/{A}", f"envs/{B}")


def test_a_rollback_to_an_env_on_the_host_switches_without_upload():
    plan = plan_env(state(active=B, envs={A: 100, B: 200}), A, keep_envs=1, base=BASE, project="ours")
    assert (plan.upload, plan.activate, plan.remove) == (False, True, ())
    assert plan.summary(0) == f"ML env: {B} → {A} (on the host already)"


def test_unfinished_transfers_are_cleaned_up_even_without_a_switch():
    plan = plan_env(state(active=A, envs={A: 1}, leftovers=[f"envs/{B}.tmp"]), A, keep_envs=2, base=BASE,
                    project="ours")
    assert (plan.activate, plan.remove) == (False, (f"envs/{B}.tmp",))


@pytest.mark.parametrize("keep", [0, 1, 5])
def test_the_wanted_env_is_never_removed(keep):
    plan = plan_env(state(active=A, envs={A: 1, B: 2, C: 3}), B, keep_envs=keep, base=BASE, project="ours")
    assert f"envs/{B}" not in plan.remove and len(plan.remove) == max(0, 2 - keep)
