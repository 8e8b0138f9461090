"""A pyinfra config file (`--config`) the fleet tools pass: pyinfra runs it before it connects, so the
report follows every host from the start and can say why a host was unreachable."""

from mlstack.report import report  # the package as the deploy runs it (pyinfra imports mlstack.deploy)

report.start()
