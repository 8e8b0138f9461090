"""An example production inventory: copy it into your own repository, list your hosts, point `stack` at
your compose project, then

    mlstack plan inventory.py      # what would change, per host, with diffs
    mlstack deploy inventory.py    # apply

Settings not given here take their defaults (docs/settings.md); group_data/<group>.py beside the
inventory may hold them per group, as pyinfra reads it.
"""

gpu_hosts = (
    [
        ("gpu-01.example.internal", {}),
        ("gpu-02.example.internal", {}),
    ],
    {
        "ssh_user": "ops",
        "_sudo": True,  # an ordinary user with passwordless sudo
        "stack": "/home/ops/ml-stack/compose",  # your compose project on the control node
        "stack_root": "/data/mlstack",
        "ml_env_dir": "/data/mlstack/ml-env",
        "model_cache_dir": "/data/mlstack/hf-cache",
        "compose_project_dir": "/data/mlstack/compose",
    },
)
