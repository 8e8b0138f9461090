#!/bin/sh
# One service's logs as `docker compose logs` prints them in the deployed project's directory (its .env names
# the compose files and the project), without color, each container's stdout and stderr; the last line is
# "@@mlstack-logs-status N", compose's exit status, so no log line can pose as it (1, with why, for a service
# the project does not have: compose would print nothing and exit 0). Changes nothing.
# usage: service_logs.sh COMPOSE_DIR SERVICE TIMESTAMPS SINCE TAIL  (TIMESTAMPS: yes or no; SINCE, TAIL: "" for
# compose's defaults)
set -eu
compose=$1
service=$2
timestamps=$3
since=$4
tail=$5
set -- logs --no-color
if [ "$timestamps" = yes ]; then set -- "$@" --timestamps; fi
if [ -n "$since" ]; then set -- "$@" --since "$since"; fi
if [ -n "$tail" ]; then set -- "$@" --tail "$tail"; fi
status=0
if ! cd -- "$compose" 2>/dev/null; then
    echo "no compose project at $compose: deploy first"
    status=1
elif ! services=$(docker compose config --services </dev/null 2>&1); then
    printf '%s\n' "$services"
    status=1
elif ! printf '%s\n' "$services" | grep -qxF -- "$service"; then
    # compose itself prints nothing and exits 0 for a service it does not know
    echo "no service $service in the project (its services: $(printf '%s\n' "$services" | paste -sd ' '))"
    status=1
else
    docker compose "$@" -- "$service" </dev/null 2>&1 || status=$?
fi
echo "@@mlstack-logs-status $status"
