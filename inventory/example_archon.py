"""Archon (files/stacks/archon) on GPU hosts: the reranker model in every host's cache, the ML env and all
GPUs for archon-server, and its Supabase credentials from the control node's environment.

    export SUPABASE_URL=... SUPABASE_SERVICE_KEY=...
    mlstack plan inventory/example_archon.py
"""

archon_hosts = (
    [
        ("gpu-01.example.internal", {}),
    ],
    {
        "ssh_user": "ops",
        "_sudo": True,
        "stack": "archon",
        "models": [{"repo_id": "Qwen/Qwen3-Reranker-0.6B", "revision": "main"}],
        "service_models": {"RERANKING_MODEL": "Qwen/Qwen3-Reranker-0.6B"},
        "service_gpus": {"archon-server": "all"},
        "ml_services": {"archon-server": {"ml_env": True, "models": ["RERANKING_MODEL"]}},
        "stack_secrets": ["SUPABASE_URL", "SUPABASE_SERVICE_KEY"],
        "http_checks": ["http://{host}:8181/health"],
    },
)
