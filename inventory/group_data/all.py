"""Defaults for every host. Override per group (inventory/group_data/<group>.py), per host in the
inventory, or per run with `--data key=value`. The README's settings table documents each one.
Directory owners are numeric: a container's uid (often 1000) need not exist on the host."""

# The stack root: parent of everything the deploy manages.
stack_root = "/srv/mlstack"
stack_root_uid = 0
stack_root_gid = 0
stack_root_mode = "0755"

# The pip --user ML environment (versioned envs below it), mounted read-only at /root/.local.
ml_env_dir = "/srv/mlstack/ml-env"
ml_env_dir_uid = 0
ml_env_dir_gid = 0
ml_env_dir_mode = "0755"

# The HuggingFace cache, mounted at /root/.cache/huggingface.
model_cache_dir = "/srv/mlstack/hf-cache"
model_cache_dir_uid = 0
model_cache_dir_gid = 0
model_cache_dir_mode = "0755"

# Where each host keeps the compose project: its files as they are, compose.mlstack.yml, .env.
compose_project_dir = "/srv/mlstack/compose"
compose_project_dir_uid = 0
compose_project_dir_gid = 0
compose_project_dir_mode = "0750"

# The ML env: a requirements file in files/ (or a path on the control node); its content, the
# base image id, the platform and the pip options make the env id.
ml_env_requirements = "requirements.ml.txt"
# Pin an env id shown by an earlier deploy (rollback: --data ml_env_id=env-…); None builds from the requirements.
ml_env_id = None
# Previous envs kept on each host besides the active one (rollback without a transfer).
keep_envs = 2
# Import-check the already active env on every run, not only when switching (`tasks.fleet.verify` turns it on).
ml_env_check_active = False
# Hash every object of each host's env store on every run, and repair what differs (`verify --hashes` turns it on).
ml_env_verify_hashes = False
# The runtime base image: the ML env is built on it and checked in it (same Python and glibc as the stack).
ml_env_base_image = "python:3.11-slim-bookworm"
# The docker engine that builds the env: "" is the control node's own (or DOCKER_HOST); or e.g. "ssh://root@gpu-01".
ml_env_builder = ""
# Where the control node keeps built env artifacts (one per env id) and which env each recipe built.
ml_env_cache_dir = "~/.cache/mlstack/ml-env"

# Package index for the env build. Credentials go in as ${VAR} from the control node's environment.
pip_index_url = ""
pip_extra_index_urls = []
pip_find_links = []
pip_trusted_hosts = []

# HuggingFace models placed in every host's cache (<model_cache_dir>/hub), each
# {"repo_id", "revision" (branch, tag or commit; default "main"), "repo_type" ("model"),
#  "allow_patterns", "ignore_patterns"}. Pin a full commit sha for reproducible fleets.
models = [{"repo_id": "Qwen/Qwen3-Reranker-0.6B", "revision": "main"}]
# The stack's model settings (environment variable -> repo_id): each must be one of `models`.
service_models = {"RERANKING_MODEL": "Qwen/Qwen3-Reranker-0.6B"}
# The GPUs each stack service gets (service -> "all", a count or a list of indices), reserved by UUID;
# services not named get none. A host with fewer GPUs than a service asks for fails before it changes.
service_gpus = {"archon-server": "all"}
# The HF endpoint: "" is $HF_ENDPOINT or huggingface.co; a mirror such as "http://hf-mirror.corp:8090".
# Credentials go in as ${VAR} from the control node's environment ("control" model_mode only).
hf_endpoint = ""
# Send the control node's HF_TOKEN to a plain http:// endpoint too (by default only to https://).
hf_token_over_http = False
# "control": the control node downloads once and sends hosts the files they lack; "host": each host downloads.
model_mode = "control"
# Hash every model file on the hosts on each run (files just transferred are always hashed).
model_verify_hashes = False
# Where the control node keeps its HF cache in "control" mode.
hf_control_cache_dir = "~/.cache/mlstack/hf"

# Your compose project, pushed to each host as it is: a directory of files/stacks/ ("archon" or
# "reranker") or an absolute path on the control node.
stack = "archon"
# Its compose files, merged in order as `docker compose -f a -f b`; [] is what compose reads without -f.
compose_files = []
# What the deploy adds to each service that uses it, in compose.mlstack.yml: the ML env (read-only at
# /root/.local) and the service_models variables it reads (the HF cache mounted, HF_HUB_OFFLINE=1).
ml_services = {"archon-server": {"ml_env": True, "models": ["RERANKING_MODEL"]}}
# Values compose interpolates the project with, written to its .env (name -> value).
stack_env = {}
# Secrets compose interpolates, read by name from the control node's environment into .env (mode 0600):
# a secret reaches only the services whose definitions read it.
stack_secrets = ["SUPABASE_URL", "SUPABASE_SERVICE_KEY"]
# Compose profiles to enable (e.g. ["agents"] for Archon's agents service).
stack_profiles = []
# URLs the control node asks once a host's services are healthy ({host}: the host's address), e.g. a
# published port's health route, as a person would check the service.
http_checks = ["http://{host}:8181/health"]
# Seconds a host's services get to become healthy after a change.
health_timeout = 180
# Registry images (`image:` without `build:`): "pull": each host pulls them as compose does; "ship": the
# builder pulls each once and the deploy sends it to the hosts that lack that image id (air-gapped fleets).
image_source = "pull"
# Logins for those registries (host[:port] -> "user:${PASSWORD_VAR}"), the password read from the control
# node's environment: given to the builder's pulls and, for one `docker compose pull`, to the hosts.
registry_credentials = {}
# Where the control node keeps built server images (docker save archives, one per image key), and the
# salt of the `.env.digest` of hosts it deploys first.
image_cache_dir = "~/.cache/mlstack/images"
# Rollout (`python -m tasks.fleet.rollout`): canary hosts first, then batches (a count or "25%"),
# stopping once more than rollout_max_failures hosts have failed.
rollout_canary = 1
rollout_batch = "25%"
rollout_max_failures = 0
