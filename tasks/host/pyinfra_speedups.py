"""Two of pyinfra's per-call costs, paid for every operation and fact on every host, made once-per-process or
cheap, with the same results (tests/unit/host/test_pyinfra_speedups.py compares each with pyinfra's own):

- `get_operation_order_from_stack` (each operation call) built `inspect.stack()`, which reads the source line of
  every frame of the call stack (`inspect.getmodule` per frame: ~15 ms an operation here); the order it returns
  needs only each frame's file name and line number, read here from the frames themselves.
- `all_global_arguments` (each operation, fact and `@deploy` call) evaluated the type hints of pyinfra's
  arguments (`typing.get_type_hints`) anew; they are constants of the installed pyinfra, evaluated once here.

`apply()` replaces them only where the names still refer to pyinfra's own functions, so a pyinfra that moved
or changed them keeps its own.
"""

from __future__ import annotations

import functools
import importlib
import sys
from types import FrameType

import pyinfra
from pyinfra.api import arguments, util

# The modules (pyinfra.api's `operation` and `facts` names are a decorator and a module's function, not these).
operation = importlib.import_module("pyinfra.api.operation")
facts = importlib.import_module("pyinfra.api.facts")


def operation_order(state) -> list[int]:
    """What `pyinfra.api.util.get_operation_order_from_stack` returns for the same call stack: the line numbers
    of the calling frames, outermost first, from the deploy file on, leaving out pyinfra's own frames."""
    frames = []
    frame: FrameType | None = sys._getframe(1)  # the caller, pyinfra's operation wrapper (pyinfra's own is left out)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    start = 0
    if state.current_deploy_filename:  # from its first frame; none: pyinfra's own frame, the last, so no frame
        start = next((number for number, each in enumerate(frames)
                      if each.f_code.co_filename == state.current_deploy_filename), len(frames))
    line_numbers = [state.current_op_file_number] if pyinfra.is_cli else []
    line_numbers += [each.f_lineno for each in frames[start:]
                     if not each.f_code.co_filename.startswith(util.PYINFRA_INSTALL_DIR)]
    return line_numbers


def apply() -> None:
    if getattr(operation, "get_operation_order_from_stack", None) is util.get_operation_order_from_stack:
        setattr(operation, "get_operation_order_from_stack", operation_order)  # noqa: B010 (a module's name)
    original = arguments.all_global_arguments
    if not hasattr(original, "cache_info"):
        cached = functools.cache(original)
        setattr(arguments, "all_global_arguments", cached)  # noqa: B010 (a module's name)
        if getattr(facts, "all_global_arguments", None) is original:
            setattr(facts, "all_global_arguments", cached)  # noqa: B010 (a module's name)
