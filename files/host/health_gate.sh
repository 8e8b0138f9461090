#!/bin/sh
# Bring the compose project up, then wait until every service is healthy (compose's healthchecks).
# Two steps, so that the two failures read apart: `up -d` creating and starting what changed fails at once
# when compose itself cannot (an image it cannot find, a port taken, an unknown runtime); then `up --wait`,
# which changes nothing more, waits for health.
# On failure: compose's output, every service's state and the failing services' last log lines go to
# stderr, for people; stdout carries only records, for the deploy's report: `up-failed LINE` for the last
# lines of compose's own message when `up` itself failed, and `failing SERVICE` (each record's text follows
# its prefix, so no log line of a service can pose as one).
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

failing() {
    compose ps -a --format '{{.Service}}: {{.State}} {{.Health}}' >&2
    compose ps -a --format '{{.Service}} {{.State}} {{.Health}}' |
        awk '$2 != "running" || ($3 != "" && $3 != "healthy") {print $1}' |
        while read -r service; do
            echo "failing $service"
            echo "last log lines of $service:" >&2
            compose logs --no-color --no-log-prefix --tail 20 "$service" </dev/null >&2
        done
}

if ! output=$(compose up -d --remove-orphans --quiet-pull 2>&1 </dev/null); then
    printf '%s\n' "$output" >&2
    echo "stack $project: docker compose up failed:" >&2
    # compose's message, without its progress lines (" Container x  Creating", ...)
    printf '%s\n' "$output" | grep -Ev '^ *(Container|Network|Volume|Image) [^ ]+ +[A-Z][a-z]+$' |
        grep -v '^[[:space:]]*$' | tail -n 5 | sed 's/^/up-failed /'
    failing
    exit 1
fi
printf '%s\n' "$output" >&2
if compose up -d --wait --wait-timeout "$timeout" --no-build --pull never --quiet-pull </dev/null; then
    exit 0
fi
echo "stack $project: not healthy within ${timeout}s:" >&2
failing
exit 1
