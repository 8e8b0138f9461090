"""A pyinfra config file (`--config`) the fleet tools pass: pyinfra runs it before it connects, so the
report follows every host from the start and can say why a host was unreachable."""

from tasks.report import report

report.start()
