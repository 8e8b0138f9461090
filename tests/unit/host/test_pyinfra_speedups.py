"""tasks/host/pyinfra_speedups.py: each replacement gives what pyinfra's own function gives."""

import sys
from types import SimpleNamespace

import pyinfra
from pyinfra.api import arguments, util

from tasks.host.pyinfra_speedups import operation_order


def nested(depth, state):
    if depth:
        return nested(depth - 1, state)
    return [order(state) for order in (util.get_operation_order_from_stack, operation_order)]  # one line: one frame


def test_operation_order_is_pyinfras(monkeypatch):
    here = sys._getframe().f_code.co_filename
    for deploy_file, least in ((here, 6), (None, 6), ("/nowhere/deploy.py", 1)):
        for cli in (True, False):
            monkeypatch.setattr(pyinfra, "is_cli", cli)
            state = SimpleNamespace(current_deploy_filename=deploy_file, current_op_file_number=7)
            theirs, ours = nested(3, state)
            assert ours == theirs
            assert len(ours) >= least + cli - 1


def test_global_arguments_are_pyinfras():
    assert arguments.all_global_arguments() == list(arguments.get_type_hints(arguments.AllArguments).items())
