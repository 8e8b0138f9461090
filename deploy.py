"""Make a host ready to serve the slim-image ML stack.

    pyinfra inventory/<fleet>.py deploy.py [--dry --diff] [--limit HOST]

Each step is one concern in tasks/ and relies on the steps before it.
"""

from pyinfra import host

from tasks.config import host_config
from tasks.directories import host_directories
from tasks.host_state import read_host_state
from tasks.lock import hold_deploy_lock
from tasks.ml_env import ml_env, ml_env_cleanup
from tasks.models import models
from tasks.stack import stack

config = host_config(host)  # validates every targeted host before anything changes

if hold_deploy_lock():  # one deploy at a time per host, held until this run disconnects
    state = read_host_state(config)  # every fact the steps below decide from, in one round trip
    host_directories(config, state.paths)
    env = ml_env(config, state.ml_env)
    snapshots = models(config, env, state.models)
    stack(config, env, snapshots, state.stack, state.gpus)
    ml_env_cleanup(config, env)  # last: only once nothing uses the envs it removes
