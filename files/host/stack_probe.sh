#!/bin/sh
# The compose project on the host: the images on the host and the layers of each, whether its engine keeps
# images in the classic store (whose `docker load` skips layers it holds), its containers' state and mlstack
# labels, and the text of the named files of its directory (each line prefixed with "| ", so no content can
# pose as a record).
# usage: stack_probe.sh COMPOSE_DIR PROJECT LABELS FILE...  (LABELS: comma-separated, printed per container)
set -eu
compose_dir=$1
project=$2
labels=$3
shift 3
format='container {{.Label "com.docker.compose.service"}}|{{.State}}|{{.Status}}'
old_ifs=$IFS
IFS=,
for label in $labels; do format="$format|{{.Label \"$label\"}}"; done
IFS=$old_ifs
docker images --no-trunc --format 'image {{.Repository}}:{{.Tag}} {{.ID}}'
docker images -q --no-trunc | sort -u | xargs -r docker image inspect --format 'layers {{range .RootFS.Layers}}{{.}} {{end}}'
docker info --format 'store {{json .DriverStatus}}'
docker ps -a --filter "label=com.docker.compose.project=$project" --format "$format"
for file in "$@"; do
    if [ -f "$compose_dir/$file" ] && [ ! -L "$compose_dir/$file" ]; then
        echo "file-begin $file"
        sed 's/^/| /' "$compose_dir/$file"
    fi
done
