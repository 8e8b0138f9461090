"""An example production inventory: copy it, list your hosts, then

    pyinfra inventory/<fleet>.py deploy.py --dry --diff     # what would change, per host
    pyinfra inventory/<fleet>.py deploy.py                  # apply

Settings not given here come from inventory/group_data/all.py (see the README's table).
"""

gpu_hosts = (
    [
        ("gpu-01.example.internal", {}),
        ("gpu-02.example.internal", {}),
    ],
    {
        "ssh_user": "ops",
        "_sudo": True,  # an ordinary user with passwordless sudo
        "stack_root": "/data/mlstack",
        "ml_env_dir": "/data/mlstack/ml-env",
        "model_cache_dir": "/data/mlstack/hf-cache",
        "compose_project_dir": "/data/mlstack/compose",
    },
)
