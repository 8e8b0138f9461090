"""tasks/host/pyinfra_speedups.py: each replacement gives what pyinfra's own function gives."""

import subprocess
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


def test_the_deploy_evaluates_pyinfras_argument_types_once_however_many_fact_classes_it_defines():
    """pyinfra's FactBase evaluates them for every fact class defined; the deploy defines a dozen at import."""
    counted = ("import typing\nfrom pyinfra.api import arguments\ncalls = []\n"
               "arguments.get_type_hints = lambda *a, **k: calls.append(1) or typing.get_type_hints(*a, **k)\n"
               "import tasks.deploy, tasks.status, tasks.prune\nprint(len(calls))")
    child = subprocess.run([sys.executable, "-c", counted], capture_output=True, text=True, check=True)
    assert child.stdout.split() == ["1"], child.stderr
