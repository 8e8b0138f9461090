"""The local rehearsal fleet (`make fleet-up N=3`): every live host, with strict host-key checks.

MLSTACK_FLEET picks the fleet (default "rehearsal"); MLSTACK_FLEET_USER=deploy logs in as the
ordinary user and uses sudo, as on fleets where root cannot log in.
"""

import os

from rehearsal import hub, registry
from rehearsal.baseimage import CACHE_DIR, IMAGE_NAME
from rehearsal.fleet import SUDO_USER, Fleet

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # the fleet's mirror (olah) serves plain HTTP, not Xet

fleet = Fleet()
_records = fleet.live_records()
if not _records:
    raise SystemExit(f"rehearsal fleet {fleet.name!r} is not up: run `make fleet-up` (or `make fleet-up N=3`) first")

_commits = hub.ensure_repos()
# The fleet registry's login, from the environment as a real one would be (rehearsal/registry.py).
os.environ.setdefault("MLSTACK_REGISTRY_PASSWORD", registry.password(fleet.dir))
login = os.environ.get("MLSTACK_FLEET_USER", "root")
if login not in ("root", SUDO_USER):
    raise SystemExit(f"MLSTACK_FLEET_USER={login!r}: expected 'root' or {SUDO_USER!r}")

rehearsal = (
    [(record.name, {"ssh_hostname": record.ip}) for record in _records],
    {
        "ssh_user": login,
        "ssh_key": str(fleet.key),
        "ssh_known_hosts_file": str(fleet.known_hosts),
        "ssh_strict_host_key_checking": "yes",
        "ssh_look_for_keys": False,
        "ssh_allow_agent": False,
        "_sudo": login != "root",
        # The container user of the model cache has no passwd entry on the hosts (numeric ids).
        "model_cache_dir_uid": 1000,
        "model_cache_dir_gid": 1000,
        "model_cache_dir_mode": "2775",
        # A small real env from the fleet's own package index, built on the first host's engine
        # (the control node runs no docker engine here).
        "ml_env_requirements": "requirements.rehearsal.txt",
        "ml_env_base_image": IMAGE_NAME,
        "ml_env_builder": f"unix://{fleet.host_dir(_records[0].name) / 'docker.sock'}",
        "ml_env_cache_dir": str(CACHE_DIR / "ml-env"),
        "pip_index_url": fleet.index_url,
        "pip_trusted_hosts": [fleet.gateway],
        # The fleet's HF mirror, models pinned by commit as a production fleet should be.
        "hf_endpoint": fleet.hub_url,
        "hf_control_cache_dir": str(CACHE_DIR / "hf"),
        "models": [
            {"repo_id": hub.MINILM, "revision": _commits[hub.MINILM]["main"]},
            {"repo_id": hub.NESTED, "revision": _commits[hub.NESTED]["main"]},
        ],
        "service_models": {"RERANKING_MODEL": hub.MINILM},
        "service_gpus": {"reranker": "all"},
        "stack": "reranker",
        "ml_services": {"reranker": {"ml_env": True, "models": ["RERANKING_MODEL"]}},
        "stack_secrets": [],
        "http_checks": ["http://{host}:8080/health", "http://{host}:8081/app.py"],
        "registry_credentials": {registry.address_of(fleet.gateway): f"{registry.USER}:${{MLSTACK_REGISTRY_PASSWORD}}"},
        "health_timeout": 60,
    },
)
