#!/bin/sh
# Pull SERVICES' images with the registry logins read from stdin (a docker config.json): they live only
# in a private directory under /run (tmpfs) for the length of the pull, never in argv or a lasting file.
# With --image, pull one image by digest instead (the runtime base image, tasks/host/runtime_image.py)
# and tag it REFERENCE.
# usage: pull_images.sh COMPOSE_DIR PROFILES SERVICE...   (PROFILES: comma-separated)
#        pull_images.sh --image NAME@DIGEST REFERENCE
set -eu
config=$(mktemp -d /run/mlstack-pull.XXXXXXXX)
trap 'rm -rf "$config"' EXIT
trap 'exit 1' HUP INT TERM
(umask 077 && cat > "$config/config.json")
if [ "$1" = --image ]; then
    DOCKER_CONFIG=$config docker pull --quiet "$2" >/dev/null
    docker tag "$2" "$3"
    exit 0
fi
compose_dir=$1
profiles=$2
shift 2
cd "$compose_dir"
DOCKER_CONFIG=$config COMPOSE_PROFILES=$profiles docker compose pull --quiet "$@"
