#!/bin/sh
# Bring the compose project up and wait until every service is healthy (compose's healthchecks).
# On failure: every service's state and the failing services' last log lines go to stderr, for
# people; stdout carries only `failing SERVICE` lines, for the deploy's report (no log line of a service can
# reach stdout, so none can pose as a record).
# usage: health_gate.sh COMPOSE_DIR PROJECT TIMEOUT PROFILES   (PROFILES: comma-separated)
set -u
compose_dir=$1
project=$2
timeout=$3
profiles=$4

compose() {
    # The project's .env names its files and project (COMPOSE_FILE, COMPOSE_PROJECT_NAME), as for a person
    # running `docker compose` in that directory.
    (cd "$compose_dir" && COMPOSE_PROFILES=$profiles docker compose "$@")
}

if compose up -d --wait --wait-timeout "$timeout" --remove-orphans --quiet-pull; then
    exit 0
fi
echo "stack $project: not healthy within ${timeout}s:" >&2
compose ps -a --format '{{.Service}}: {{.State}} {{.Health}}' >&2
compose ps -a --format '{{.Service}} {{.State}} {{.Health}}' |
    awk '$2 != "running" || ($3 != "" && $3 != "healthy") {print $1}' |
    while read -r service; do
        echo "failing $service"
        echo "last log lines of $service:" >&2
        compose logs --no-color --no-log-prefix --tail 20 "$service" </dev/null >&2
    done
exit 1
