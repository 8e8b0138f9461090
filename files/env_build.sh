#!/bin/sh
# The ML env build, run in the bootstrap container: pip --user installs the requirements, then torch
# (if the env has it) reports its version, CUDA version and build arch list to /build/torch.json.
# Bytecode is compiled unchecked-hash, not by timestamp: on hosts a file's content is stored once and
# shared by every env that holds it, with one mtime, so a timestamp pyc of a later env would never match
# its source (and, the env mounted read-only, be compiled again at every import).
#
# pip's config (index settings, credentials too) is the first CONFIG_BYTES bytes of stdin and lives
# only in the tmpfs /run/pip, gone when the container stops; pip_install.py removes it from there once
# open, and lets pip alone read it (no sdist's build backend sees it). stdin then stays open for as long
# as the deploy that started the build is connected: when it closes (the deploy was killed), pip is
# stopped, so no credential outlives the deploy on the builder.
# usage: env_build.sh CONFIG_BYTES
set -eu
exec 3<&0  # the deploy's stdin, for the watcher: a background job's own stdin is /dev/null
config=/run/pip/pip.conf
head -c "$1" >"$config"
python3 /build/pip_install.py "$config" install --user --no-compile --no-warn-script-location \
    -r /build/requirements.txt &
pip=$!
{ cat <&3 >/dev/null; kill "$pip" 2>/dev/null || true; } &
status=0
wait "$pip" || status=$?
rm -f "$config"
[ "$status" -eq 0 ] || exit "$status"
# as pip's own compile step: a module that does not compile (a py2 test file, a template) is left as it is
python3 -m compileall -q -q -j 0 --invalidation-mode unchecked-hash /root/.local/lib || true
python3 /build/torch_info.py >/build/torch.json
