"""Make a host ready to serve a team's compose project, from a checkout of this repository:

    pyinfra inventory/<fleet>.py deploy.py [--dry --diff] [--limit HOST]

The steps are in tasks/deploy.py (installed: `mlstack.deploy`), which `mlstack plan|deploy` runs too.
"""

from tasks.deploy import converge

converge()
