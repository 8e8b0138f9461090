#!/bin/sh
# The ML env dir: room left for it, the host's arch and runtime base image, the active env, our entries.
# usage: ml_env_probe.sh ENV_DIR BASE_IMAGE
set -eu
env_dir=$1
image=$2
place=$env_dir
while [ ! -e "$place" ]; do place=$(dirname "$place"); done
echo "free $(df -Pk "$place" | awk 'NR==2 {print $4}')"
echo "arch $(uname -m)"
echo "image $(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
cd "$env_dir" 2>/dev/null || exit 0
echo "active $(readlink active || true)"
for entry in envs/* incoming/*; do
    [ -e "$entry" ] && echo "entry $(stat -c %Y "$entry") $entry"
done
exit 0
