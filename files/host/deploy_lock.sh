#!/bin/sh
# Take the deploy lock without waiting: print "locked", then hold it until stdin closes (the
# deploy's SSH channel); or print "held by " and who holds it; or "unsafe: " and why not.
# The lock lives in a directory root alone can write, made here if missing: a local user can
# neither hold the lock nor plant a link where it is opened.
# usage: deploy_lock.sh LOCK_DIR WHO
set -eu
lock_dir=$1
who=$2
umask 077
if ! { [ -e "$lock_dir" ] || [ -L "$lock_dir" ] || mkdir -m 0700 -- "$lock_dir" 2>/dev/null; }; then
    echo "unsafe: $(id -un) cannot make $lock_dir: the deploy works as root (ssh as root, or --sudo)"
    exit 0
fi
if [ -L "$lock_dir" ] || [ ! -d "$lock_dir" ] || [ "$(stat -c %u:%a -- "$lock_dir")" != "$(id -u):700" ]; then
    echo "unsafe: $lock_dir is not a directory that only $(id -un) can use (mode 0700, not a link)"
    exit 0
fi
exec 9<>"$lock_dir/deploy.lock"
if flock -n 9; then
    printf '%s\n' "$who" >"$lock_dir/deploy.lock"
    echo locked
    exec cat >/dev/null
fi
echo "held by $(head -1 "$lock_dir/deploy.lock")"
