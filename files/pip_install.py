"""pip with a config file (index settings, credentials too) that pip alone reads: not the builds it runs.

pip hands its environment to every process it starts: the build backend of each sdist (setup.py, any code
the index serves) and the pip that installs its build requirements (which gets the index settings in its
arguments instead). So PIP_CONFIG_FILE is set only while pip reads its config, at its start, before it starts
anything; and the file is removed from its directory first, read through this process's own descriptor,
which no child inherits (PEP 446). What pip starts gets neither the variable, nor the file, nor the descriptor.
usage: python3 pip_install.py CONFIG PIP_ARGUMENTS...
"""

import os
import sys

from pip._internal.cli.main import main
from pip._internal.configuration import Configuration


def config_only_while_loading(path: str):
    """Configuration.load with PIP_CONFIG_FILE=PATH for as long as it runs, and never after."""
    load = Configuration.load

    def load_with_config(self) -> None:
        os.environ["PIP_CONFIG_FILE"] = path
        try:
            load(self)
        finally:
            del os.environ["PIP_CONFIG_FILE"]

    return load_with_config


def run(config: str, arguments: list[str]) -> int:
    descriptor = os.open(config, os.O_RDONLY | os.O_NOFOLLOW)
    os.unlink(config)
    Configuration.load = config_only_while_loading(f"/proc/self/fd/{descriptor}")
    return main(arguments)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
