#!/bin/sh
# The compose project on the host: the stack's images, its containers' state and mlstack labels, its files.
# usage: stack_probe.sh COMPOSE_DIR PROJECT REPOSITORY
set -eu
compose_dir=$1
project=$2
repository=$3
docker images --no-trunc --format 'image {{.Repository}}:{{.Tag}} {{.ID}}' "$repository"
docker ps -a --filter "label=com.docker.compose.project=$project" --format \
    'container {{.Label "com.docker.compose.service"}}|{{.State}}|{{.Status}}|{{.Label "mlstack.config"}}|{{.Label "mlstack.env-id"}}|{{.Label "mlstack.models"}}|{{.Label "mlstack.image"}}'
for file in docker-compose.yml .env.digest; do
    if [ -f "$compose_dir/$file" ]; then
        echo "file-begin $file"
        sed 's/^/| /' "$compose_dir/$file"
    fi
done
