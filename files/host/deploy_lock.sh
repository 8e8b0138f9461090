#!/bin/sh
# Take the deploy lock without waiting: print "locked", then hold it until stdin closes (the
# deploy's SSH channel); or print "held by " and who holds it.
# usage: deploy_lock.sh LOCK_FILE WHO
set -eu
lock_file=$1
who=$2
mkdir -p "$(dirname "$lock_file")"
exec 9<>"$lock_file"
if flock -n 9; then
    printf '%s\n' "$who" >"$lock_file"
    echo locked
    exec cat >/dev/null
fi
echo "held by $(head -1 "$lock_file")"
