"""Import every top-level requirement of the mounted ML env, and require each to come from the env.

Runs inside the runtime image with the env mounted read-only at MOUNT (argv[1]); the env's own
.mlstack-env.json says what to import and for which Python. Exit status 1 with what failed.
"""

import importlib
import json
import os
import sys

mount, info_name = sys.argv[1], sys.argv[2]
# the env's owner controls the file: not followed if a link, no wait if a FIFO
with open(os.open(f"{mount}/{info_name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)) as file:
    info = json.load(file)
have = "python%d.%d" % sys.version_info[:2]
if info["python"] != have:
    sys.exit("ML env %s is built for %s, the runtime image runs %s" % (info["env_id"], info["python"], have))
failed = []
for dist, names in sorted(info["imports"].items()):
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 (any import error is a finding to report)
            failed.append("%s (from %s): %s: %s" % (name, dist, type(error).__name__, error))
            continue
        where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "a built-in")
        if not where.startswith(mount + "/"):
            failed.append("%s (from %s) was imported from %s, not from the env" % (name, dist, where))
if failed:
    sys.exit("ML env %s does not import in the runtime image:\n  %s" % (info["env_id"], "\n  ".join(failed)))
print("ML env %s: %d packages import" % (info["env_id"], len(info["imports"])))
