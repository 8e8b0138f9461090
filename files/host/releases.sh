#!/bin/sh
# The stack's releases, in RELEASES_DIR (root's, 0700: a release keeps the project's .env): RELEASES_DIR/<id>/
# holds release.json (what the deploy recorded), images (service and image id per line, read here from the
# project's containers), activated (when it last became the running release) and project/, the files the
# deploy placed in the compose directory (.mlstack-files names them) with .env, .env.digest and
# .mlstack-files. `current` links to the running release. Every release appears whole or not at all (made
# under a temporary name, then renamed).
# usage: releases.sh record RELEASES_DIR ID COMPOSE_DIR PROJECT JSON  (JSON: release.json, one line)
#        releases.sh list RELEASES_DIR
#        releases.sh stage RELEASES_DIR ID COMPOSE_DIR STAGE      (its project as COMPOSE_DIR/STAGE/project.tar)
#        releases.sh forget RELEASES_DIR ID...                    (never the current one)
set -eu
umask 077
command=$1
dir=$2
shift 2

safe_dir() {  # RELEASES_DIR is root's own directory, not a link: nobody else can plant a release there
    if [ -L "$dir" ] || [ ! -d "$dir" ] || [ "$(stat -c %u:%a -- "$dir")" != "0:700" ]; then
        echo "releases.sh: $dir is not a directory only root can use (mode 0700, not a link)" >&2
        exit 3
    fi
}

case $command in
record)
    id=$1 compose=$2 project=$3 json=$4
    [ -e "$dir" ] || [ -L "$dir" ] || mkdir -m 0700 -- "$dir"
    safe_dir
    if [ ! -d "$dir/$id" ]; then
        tmp="$dir/.$id.tmp-$$"
        rm -rf -- "$tmp"
        mkdir -p -- "$tmp/project"
        printf '%s\n' "$json" >"$tmp/release.json"
        docker ps -aq --filter "label=com.docker.compose.project=$project" | while read -r container; do
            docker inspect --format '{{index .Config.Labels "com.docker.compose.service"}} {{.Image}}' "$container"
        done >"$tmp/images"
        while read -r sum path; do
            case $sum in '#'*) continue ;; esac  # a `# mode` line: cp -p keeps the file's mode
            case $path in /* | *..*) continue ;; esac  # only relative names the deploy wrote
            mkdir -p -- "$tmp/project/$(dirname -- "$path")"
            cp -p -- "$compose/$path" "$tmp/project/$path"
        done <"$compose/.mlstack-files"
        cp -p -- "$compose/.env" "$compose/.env.digest" "$compose/.mlstack-files" "$tmp/project/"
        mv -T -- "$tmp" "$dir/$id"
    fi
    date -u +%Y-%m-%dT%H:%M:%SZ >"$dir/$id/activated.tmp"
    mv -f -- "$dir/$id/activated.tmp" "$dir/$id/activated"
    ln -sfn -- "$id" "$dir/.current.tmp"
    mv -T -- "$dir/.current.tmp" "$dir/current"
    ;;
list)
    [ -e "$dir" ] || exit 0
    safe_dir
    for release in "$dir"/rel-*; do
        [ -f "$release/release.json" ] || continue
        echo "release ${release##*/}"
        echo "activated $(head -c 64 "$release/activated" 2>/dev/null || true)"
        echo "json $(tr -d '\n' <"$release/release.json")"
        sed 's/^/image /' "$release/images"
    done
    if [ -L "$dir/current" ]; then echo "current $(readlink -- "$dir/current")"; fi
    ;;
stage)
    id=$1 compose=$2 stage=$3  # STAGE: the run's own name (stage_project.sh)
    safe_dir
    mkdir -m 0700 -- "$compose/$stage"
    tar -cf "$compose/$stage/project.tar" -C "$dir/$id/project" .
    ;;
forget)
    safe_dir
    current=$(readlink -- "$dir/current" 2>/dev/null || true)
    for id in "$@"; do
        if [ "$id" != "$current" ]; then rm -rf -- "${dir:?}/$id"; fi
    done
    ;;
*)
    echo "releases.sh: unknown command $command" >&2
    exit 2
    ;;
esac
