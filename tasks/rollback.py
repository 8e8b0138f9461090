"""`mlstack rollback`: put each host's stack back to a release it keeps (the previous one, or the one named
in $MLSTACK_ROLLBACK_TO), as a pyinfra packaged deploy the rollout runs canary first, then in batches.

Nothing is built, downloaded or sent: the release's project files and .env come from the host's own copy
(`<stack_root>/releases/<id>/project`), and its env, image ids and model snapshots must still be on the host,
or the host fails before anything changes, saying what is gone. A release of another compose project
brings the running project down first (its named volumes stay). Then compose brings the release up behind
the same health gate as a deploy, and the release becomes the current one.
"""

from __future__ import annotations

import os

from pyinfra import host
from pyinfra.api import operation

from .host import ml_env, owners, releases, stack, stack_health, stack_push
from .host.failure import fail_host
from .host.lock import hold_deploy_lock
from .host.models import ModelCacheFact, ModelCacheState
from .host.probe import ProbePart, probe_host
from .host.programs import program
from .host.releases import RELEASE_ID, Release, ReleasesState
from .host.transfer import as_owner
from .report import ServiceOutcome, StackOutcome, report
from .validation import host_config

ROLLBACK_TO = "MLSTACK_ROLLBACK_TO"  # a release id; unset or empty: the release that ran before the current one


def target_of(state: ReleasesState, wanted: str) -> Release | str:
    """The release to go back to, or why there is none."""
    if wanted and not RELEASE_ID.fullmatch(wanted):
        return f"{ROLLBACK_TO}={wanted!r}: expected a release id such as 'rel-0123456789abcdef' (mlstack status)"
    if wanted:
        return state.releases.get(wanted) or (f"release {wanted} is not kept on this host (kept: "
                                              f"{', '.join(state.releases) or 'none'})")
    return state.previous() or "no earlier release is kept on this host: there is nothing to roll back to"


def missing_parts(release: Release, envs: ml_env.MlEnvState, models: ModelCacheState, image_ids: set[str]
                  ) -> list[str]:
    """What RELEASE needs that the host no longer holds (a rollback builds and downloads nothing)."""
    missing = []
    if release.env and release.env not in envs.envs:
        missing.append(f"env {release.env} (removed beyond keep_envs)")
    for folder, commit in sorted(release.models.items()):
        if commit not in getattr(models.repos.get(folder), "snapshots", ()):
            missing.append(f"model snapshot {folder}@{commit[:12]}")
    for service, image_id in sorted(release.image_ids.items()):
        if image_id not in image_ids:
            missing.append(f"image {image_id[:19]} of service {service}")
    return missing


def held_models(config, target: Release) -> ModelCacheState | None:
    """The model cache's state for TARGET's models (framed like every probe: a cut-off part fails the host)."""
    read = probe_host(ProbePart("models", ModelCacheFact, {"cache_dir": config.model_cache_dir,
                                                          "folders": tuple(sorted(target.models))}))
    return read[0] if read else None


def rollback() -> None:
    """The rollback's steps for one host (pyinfra runs it for each)."""
    report.start()
    config = host_config(host)
    if not hold_deploy_lock():
        return
    on_host = owners.probe_checked(config, releases.probe_part(config), ml_env.probe_part(config),
                                   stack.probe_part(config))
    if on_host is None:
        return
    kept, envs, running = on_host
    target = target_of(kept, os.environ.get(ROLLBACK_TO, ""))
    if isinstance(target, str):
        fail_host("Rollback", target)
        return
    current = kept.releases.get(kept.current)
    record = report[host.name]
    record.stack = StackOutcome(target.project, sorted(set(target.images.values())))
    record.planned = True
    if target.id == kept.current:
        host.log(f"rollback: {target.id} is already the running release: no change")
        record.stack.health = "healthy"
        return
    if (models := held_models(config, target)) is None:
        return  # the host failed, naming the part that did not read whole
    missing = missing_parts(target, envs, models, set(running.images.values()))
    if missing:
        fail_host("Rollback", f"release {target.id} cannot be put back without a transfer: "
                              f"{', '.join(missing)} no longer on this host")
        return
    host.log(f"rollback: {current.id if current else 'the running stack'} → {target.id} "
             f"(recorded {target.created} by {target.control_node}; project {target.project}, "
             f"env {target.env or 'none'})")
    record.changed("stack")
    record.stack.services = {service: ServiceOutcome("recreate", f"rollback to {target.id}")
                             for service in target.image_ids}
    for other in sorted(running.projects - {target.project}):  # a switch back: the running project goes first
        stack_push.bring_down(name=f"Bring project {other} down (its volumes stay)", project=other,
                              compose_dir=config.compose_project_dir)
    restore_project(name=f"Project files of {target.id}", releases_dir=releases.releases_dir(config),
                    release=target.id, compose_dir=config.compose_project_dir)
    if target.env and target.env != envs.active:
        switch_env(name=f"Switch the env to {target.env}", env_dir=config.ml_env_dir, env=target.env,
                   owner=ml_env.env_owner(config))
    stack_health.converge_stack(name=f"Up and healthy: {target.project}", project=target.project,
                                compose_dir=config.compose_project_dir, profiles=list(target.profiles),
                                timeout=config.health_timeout, checks=config.http_checks,
                                services=sorted(target.image_ids))
    releases.record_release(name=f"Release {target.id}", releases_dir=releases.releases_dir(config),
                            release=target, compose_dir=config.compose_project_dir)


@operation(is_idempotent=False)
def restore_project(releases_dir: str, release: str, compose_dir: str):
    """The release's own copy of the project staged, checked by compose and moved into place, as a push does."""
    yield program("releases.sh", "stage", releases_dir, release, compose_dir, stack_push.STAGE)
    yield stack_push.stack_locked(compose_dir, "install_project.sh", compose_dir, stack_push.STAGE)


@operation(is_idempotent=False)
def switch_env(env_dir: str, env: str, owner: tuple[int, int]):
    """Point `active` at an env the host keeps (it passed its import check when it was installed)."""
    yield as_owner(*owner, ml_env.switch_active_command(env_dir, env))
