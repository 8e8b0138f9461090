#!/bin/sh
# Run the host program NAME (its TEXT, with ARGS) holding the compose directory's lock, COMPOSE_DIR/.mlstack-lock,
# as every step that changes the stack does (the project's install, compose up, compose down). A step that a
# lost connection left running keeps the lock until it ends (the compose processes it started hold it too),
# so the next run's step waits for it, up to WAIT seconds, instead of working beside it.
# usage: stack_locked.sh COMPOSE_DIR WAIT NAME TEXT [ARGS...]
set -eu
compose_dir=$1
wait=$2
name=$3
text=$4
shift 4
exec 9>>"$compose_dir/.mlstack-lock"
if ! flock -w "$wait" 9; then
    printf '%s: a step of an earlier run (its connection lost) still holds %s/.mlstack-lock after %ss: let it end, then run again\n' \
        "$name" "$compose_dir" "$wait" >&2
    exit 1
fi
exec sh -c "$text" "$name" "$@"
