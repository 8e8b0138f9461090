#!/bin/sh
# The ML env dir: room left for it, the host's arch and runtime base image, the active env, our entries,
# and the envs a container on the host mounts (any container, running or not), with its compose project.
# Names holding a newline are skipped (the parser takes only the names this deploy writes), so no
# name or link target can pose as a record.
# usage: ml_env_probe.sh ENV_DIR BASE_IMAGE
set -eu
env_dir=$1
image=$2
nl='
'
place=$env_dir
while [ ! -e "$place" ]; do place=$(dirname "$place"); done
echo "free $(df -Pk -- "$place" | awk 'NR==2 {print $4}')"
echo "arch $(uname -m)"
echo "image $(docker image inspect -f '{{.Id}}' -- "$image" 2>/dev/null || true)"
tab=$(printf '\t')
# shellcheck disable=SC2016 # a docker template, not shell
docker ps -aq 2>/dev/null |
    xargs -r docker inspect -f '{{$p := index .Config.Labels "com.docker.compose.project"}}{{range .Mounts}}{{printf "%s\t%s\n" .Source $p}}{{end}}' 2>/dev/null |
    while IFS=$tab read -r source project; do
        case $source in
            "$env_dir"/envs/*) rest=${source#"$env_dir"/envs/} && echo "mounted envs/${rest%%/*} $project" ;;
        esac
    done
cd "$env_dir" 2>/dev/null || exit 0
active=$(readlink active || true)
case $active in *"$nl"*) active="" ;; esac
echo "active $active"
for entry in envs/* incoming/*; do
    case $entry in *"$nl"*) continue ;; esac
    if [ -e "$entry" ]; then echo "entry $(stat -c %Y -- "$entry") $entry"; fi
done
exit 0
