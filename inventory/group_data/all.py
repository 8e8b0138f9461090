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

# The docker compose project: docker-compose.yml, .env and build context.
compose_project_dir = "/srv/mlstack/compose"
compose_project_dir_uid = 0
compose_project_dir_gid = 0
compose_project_dir_mode = "0750"
