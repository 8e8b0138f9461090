"""Make a host ready to serve the slim-image ML stack.

    pyinfra inventory/<fleet>.py deploy.py [--dry --diff] [--limit HOST]

Each step is one concern of tasks/host/ and relies on the steps before it; the control side
(builds, downloads, caches) is in tasks/control/. With MLSTACK_REPORT=<file> in the environment,
the run writes its per-host report there (tasks/report.py).
"""

from pyinfra import host

from tasks.config import host_config
from tasks.host import directories, gpus, ml_env, models, stack
from tasks.host.lock import hold_deploy_lock
from tasks.host.probe import probe_host
from tasks.report import report

report.start()
config = host_config(host)  # validates every targeted host before anything changes

if hold_deploy_lock():  # one deploy at a time per host, held until this run disconnects
    on_host = probe_host(  # every concern's state, read in one round trip
        directories.probe_part(config), ml_env.probe_part(config), models.probe_part(config), gpus.probe_part(),
        stack.probe_part(config))
    if on_host:  # None: a part of the probe failed, and so did this host
        paths, env_dir, model_cache, host_gpus, compose_project = on_host
        directories.converge(config, paths)
        env = ml_env.converge(config, env_dir, host_gpus)
        snapshots = models.converge(config, env, model_cache)
        stack.converge(config, env, snapshots, compose_project, gpus.report_gpus(host_gpus))
        ml_env.cleanup(config, env)  # last: only once nothing uses the envs it removes
        report[host.name].planned = True
