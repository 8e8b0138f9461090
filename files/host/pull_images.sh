#!/bin/sh
# Pull SERVICES' images with the registry logins read from stdin (a docker config.json): they live only
# in a private directory under /run (tmpfs) for the length of the pull, never in argv or a lasting file.
# usage: pull_images.sh COMPOSE_DIR PROFILES SERVICE...   (PROFILES: comma-separated)
set -eu
compose_dir=$1
profiles=$2
shift 2
config=$(mktemp -d /run/mlstack-pull.XXXXXXXX)
trap 'rm -rf "$config"' EXIT
trap 'exit 1' HUP INT TERM
(umask 077 && cat > "$config/config.json")
cd "$compose_dir"
DOCKER_CONFIG=$config COMPOSE_PROFILES=$profiles docker compose pull --quiet "$@"
