"""Bad inventory data against a real fleet: refused before any host changes. (The catalogue of bad values and
their exact messages, read through pyinfra's own --data parsing: tests/unit/test_bad_data_catalogue.py.)"""

from __future__ import annotations


def test_bad_data_is_refused_on_every_host_with_every_message_and_no_host_changes(fleet):
    fleet.wipe()
    run = fleet.deploy("--data", "ml_env_dir=srv/x", "--data", 'stack_secrets=["MLSTACK_NOT_SET_ANYWHERE"]')
    assert run.returncode != 0
    for record in fleet.hosts:
        for message in ("ml_env_dir = 'srv/x': expected an absolute path such as '/srv/mlstack'",
                        "stack_secrets = ['MLSTACK_NOT_SET_ANYWHERE']: expected MLSTACK_NOT_SET_ANYWHERE to be set"):
            assert f"{record.name}: {message}" in run.output, run.output[-2000:]
        assert fleet.ssh(record, "ls /srv/mlstack 2>&1 || true").strip().endswith("No such file or directory")
    assert not run.executed
    assert "Traceback" not in run.output
