#!/bin/sh
# Put the compose project staged in COMPOSE_DIR/.next/project.tar in place: unpack it in .next, check it
# with compose itself, then move each file into place (one rename each), remove what the previous push
# placed and this one does not, and write .mlstack-files last: it records a complete push.
# usage: install_project.sh COMPOSE_DIR
set -eu
cd "$1"
mkdir .next/tree
tar -xf .next/project.tar -C .next/tree --no-same-owner
(cd .next/tree && docker compose config -q)
if [ -f .mlstack-files ]; then
    while read -r _ path; do
        case $path in /* | *..*) continue ;; esac  # only relative names the deploy wrote
        [ -e ".next/tree/$path" ] || rm -f -- "$path"
    done < .mlstack-files
fi
(cd .next/tree && find . -type f ! -path ./.mlstack-files) | while read -r path; do
    mkdir -p -- "$(dirname -- "$path")"
    mv -f -- ".next/tree/$path" "$path"
done
mv -f .next/tree/.mlstack-files .mlstack-files
rm -rf .next
