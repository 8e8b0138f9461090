"""Which release a rollback puts back, and what it refuses to do without a transfer."""

from tasks.host.ml_env import MlEnvState
from tasks.host.models import ModelCacheState, RepoCacheState
from tasks.host.releases import ReleasesState, new_release
from tasks.rollback import missing_parts, target_of

IMAGE = "sha256:" + "ab" * 32
OLD = new_release("shop", "1" * 64, "env-1111111111111111", {"models--org--m": "a" * 40}, {"web": "shop:1"}, "s" * 16)
NEW = new_release("shop", "2" * 64, "env-2222222222222222", {"models--org--m": "b" * 40}, {"web": "shop:2"}, "s" * 16)
KEPT = ReleasesState({OLD.id: OLD, NEW.id: NEW}, NEW.id)


def test_the_previous_release_by_default_or_the_one_named():
    assert target_of(KEPT, "") == OLD and target_of(KEPT, NEW.id) == NEW
    assert target_of(KEPT, "rel-0000000000000000") == (
        f"release rel-0000000000000000 is not kept on this host (kept: {OLD.id}, {NEW.id})")
    assert target_of(KEPT, "../etc").startswith("MLSTACK_ROLLBACK_TO='../etc': expected a release id")
    assert target_of(ReleasesState({NEW.id: NEW}, NEW.id), "") == (
        "no earlier release is kept on this host: there is nothing to roll back to")


def envs(*ids: str) -> MlEnvState:
    return MlEnvState(active=ids[-1] if ids else None, envs={env: 0 for env in ids}, leftovers=(), free_bytes=0,
                      arch="x86_64", image_id=None)


def cache(**snapshots: tuple[str, ...]) -> ModelCacheState:
    repos = {folder.replace("__", "--"): RepoCacheState({}, frozenset(commits), {}, {}, frozenset(), {}, ())
             for folder, commits in snapshots.items()}
    return ModelCacheState(repos, 0)


def test_a_release_whose_env_snapshot_or_image_is_gone_cannot_be_put_back():
    old = OLD.__class__(**{**OLD.__dict__, "image_ids": {"web": IMAGE}})
    assert missing_parts(old, envs(OLD.env, NEW.env), cache(models__org__m=("a" * 40, "b" * 40)), {IMAGE}) == []
    assert missing_parts(old, envs(NEW.env), cache(models__org__m=("b" * 40,)), set()) == [
        "env env-1111111111111111 (removed beyond keep_envs)", f"model snapshot models--org--m@{'a' * 12}",
        f"image {IMAGE[:19]} of service web"]
