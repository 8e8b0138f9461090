"""Uploads through OpenSSH reach a host as the deploy's own connection does, or not at all: the argv is
read off pyinfra's connector data, and a password of any kind keeps the upload on that connection."""

import subprocess

import pytest
from pyinfra.api import Config, Inventory, State

from tasks.host.channel import ssh_command

HOST = {"ssh_hostname": "10.0.0.5", "ssh_user": "deploy", "ssh_key": "/keys/id ed", "ssh_port": 2222,
        "ssh_known_hosts_file": "/keys/known hosts", "ssh_look_for_keys": False, "ssh_allow_agent": False,
        "ssh_strict_host_key_checking": "yes"}


def connected(data: dict):
    """A pyinfra host with DATA whose SSH connection stands (a placeholder client: nothing is dialled)."""
    inventory = Inventory(([("gpu-01", data)], {}))
    state = State(inventory, Config())
    host = inventory.get_host("gpu-01")
    host.connector.client = object()
    return state, host


def test_the_argv_carries_the_connections_settings_and_the_command_wrapped_as_pyinfra_wraps_it():
    state, host = connected(HOST)
    argv = ssh_command(state, host, "cat > /srv/x", {"_sudo": True})
    assert argv == ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ControlMaster=no", "-o", "StrictHostKeyChecking=yes",
                    "-p", "2222", "-i", "/keys/id ed", "-l", "deploy", "-o", 'UserKnownHostsFile="/keys/known hosts"',
                    "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "--", "10.0.0.5",
                    "sudo -H -n sh -c 'cat > /srv/x'"]
    # OpenSSH reads those options as this test expects (its own parser, no connection made)
    seen = subprocess.run([*argv[:-3], "-G", "10.0.0.5"], capture_output=True, text=True, check=True).stdout
    assert {"port 2222", "user deploy", "batchmode yes", "stricthostkeychecking true", "identitiesonly yes",
            "identityagent none", "userknownhostsfile /keys/known hosts"} <= set(seen.splitlines())


@pytest.mark.parametrize(("data", "arguments"), [
    ({"ssh_password": "pw"}, {}),
    ({"ssh_key_password": "pw"}, {}),
    ({}, {"_sudo": True, "_sudo_password": "pw"}),
    ({"ssh_paramiko_connect_kwargs": {"timeout": 5}}, {}),
    ({"ssh_strict_host_key_checking": "ask"}, {}),
    ({"ssh_known_hosts_file": '/keys/"odd"'}, {}),
])
def test_what_ssh_would_ask_for_or_take_in_its_argv_keeps_the_upload_on_the_deploys_connection(data, arguments):
    state, host = connected({**HOST, **data})
    assert ssh_command(state, host, "cat > /srv/x", arguments) is None


def test_a_host_not_reached_over_ssh_gets_no_argv():
    state, host = connected(HOST)
    host.connector.client = None
    assert ssh_command(state, host, "true", {}) is None
