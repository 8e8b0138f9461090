#!/bin/sh
# The compose project on the host: the images on the host, its containers' state and mlstack labels, and the
# text of the named files of its directory (each line prefixed with "| ", so no content can pose as a record);
# with EXTERNALS "yes", first the name of every volume and network (`volume "NAME"`, `network "NAME"`: JSON
# strings, so no name can pose as a record) between the lines "externals" and "externals-end".
# usage: stack_probe.sh COMPOSE_DIR PROJECT LABELS EXTERNALS FILE...  (LABELS: comma-separated, printed per
# container; EXTERNALS: yes or no)
set -eu
compose_dir=$1
project=$2
labels=$3
externals=$4
shift 4
if [ "$externals" = yes ]; then
    echo externals
    docker volume ls --format 'volume {{json .Name}}'
    docker network ls --format 'network {{json .Name}}'
    echo externals-end
fi
format='container {{.Label "com.docker.compose.service"}}|{{.State}}|{{.Status}}'
old_ifs=$IFS
IFS=,
for label in $labels; do format="$format|{{.Label \"$label\"}}"; done
IFS=$old_ifs
docker images --no-trunc --format 'image {{.Repository}}:{{.Tag}} {{.ID}}'
docker ps -a --filter "label=com.docker.compose.project=$project" --format "$format"
# every compose project with containers started from this directory: another one is what a switch replaces
docker ps -a --filter "label=com.docker.compose.project.working_dir=$compose_dir" \
    --format 'project {{.Label "com.docker.compose.project"}}' | sort -u
for file in "$@"; do
    if [ -f "$compose_dir/$file" ] && [ ! -L "$compose_dir/$file" ]; then
        echo "file-begin $file"
        sed 's/^/| /' "$compose_dir/$file"
    fi
done
