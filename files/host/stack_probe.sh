#!/bin/sh
# The compose project on the host: the stack's images, its containers' state and mlstack labels, its files.
# usage: stack_probe.sh COMPOSE_DIR PROJECT REPOSITORY LABEL...  (the labels printed for each container)
set -eu
compose_dir=$1
project=$2
repository=$3
shift 3
format='container {{.Label "com.docker.compose.service"}}|{{.State}}|{{.Status}}'
for label in "$@"; do format="$format|{{.Label \"$label\"}}"; done
docker images --no-trunc --format 'image {{.Repository}}:{{.Tag}} {{.ID}}' "$repository"
docker ps -a --filter "label=com.docker.compose.project=$project" --format "$format"
for file in docker-compose.yml .env.digest; do
    if [ -f "$compose_dir/$file" ]; then
        echo "file-begin $file"
        sed 's/^/| /' "$compose_dir/$file"
    fi
done
