# pyinfra's argument type hints are evaluated once per process, before the first fact class here asks for them
# (FactBase.__init_subclass__ evaluates them anew for every fact class otherwise): tasks/host/pyinfra_speedups.py.
from . import pyinfra_speedups

pyinfra_speedups.apply()
