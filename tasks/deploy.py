"""The deploy: `converge()` makes each targeted host ready to serve the team's compose project, step by step;
`mlstack_deploy()` is the same as a pyinfra packaged deploy (`@deploy`, with the settings' defaults as data).

Each step is one concern of `host/` and relies on the steps before it; the control side (builds, downloads,
caches) is in `control/`. Run it with `mlstack plan|deploy INVENTORY`, `pyinfra INVENTORY deploy.py` from a
checkout, or call it from a team's own deploy.py. With MLSTACK_REPORT=<file> in the environment, the run
writes its per-host report there (report.py).
"""

from pyinfra import host
from pyinfra.api import deploy

from .config import DEFAULTS
from .control.fleet_context import FleetContext
from .host import directories, gpus, ml_env, models, owners, releases, runtime_image, stack
from .host.lock import hold_deploy_lock
from .report import report
from .validation import host_config

fleet = FleetContext()  # what the control side knows for the whole fleet, made before any host is planned


def converge() -> None:
    """The deploy's steps for one host (pyinfra runs it for each). `mlstack plan|deploy` and deploy.py run it
    as it is, a team's own deploy through `mlstack_deploy` (its operations then named `mlstack | …`)."""
    report.start()
    config = host_config(host)  # validates every targeted host before anything changes
    if not hold_deploy_lock():  # one deploy at a time per host, held until this run disconnects
        return
    on_host = owners.probe_checked(  # every concern's state, read in one round trip, and who owns what is below
        config, directories.probe_part(config), ml_env.probe_part(config), models.probe_part(config),
        gpus.probe_part(), stack.probe_part(config), releases.probe_part(config))
    if on_host is None:  # a part of the probe failed, or another user owns what the deploy works on: the host failed
        return
    paths, env_dir, model_cache, host_gpus, compose_project, kept = on_host
    directories.converge(config, paths)
    base = runtime_image.converge(config, fleet, env_dir)  # the image the env runs in, put on the host if it is wanted
    env = ml_env.converge(config, fleet, env_dir, base, host_gpus)  # NoEnv when no service uses it
    snapshots = models.converge(config, env, model_cache)
    running = stack.converge(config, fleet, env, snapshots, compose_project, gpus.report_gpus(host_gpus))
    releases.converge(config, kept, running)  # once the stack is up and healthy: what a rollback puts back
    ml_env.cleanup(config, env)  # last: only once nothing uses the envs it removes
    report[host.name].planned = True


mlstack_deploy = deploy("mlstack", data_defaults=DEFAULTS)(converge)  # pyinfra's packaged deploy, for teams
