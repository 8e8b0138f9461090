#!/bin/sh
# What `mlstack prune` reads and removes on a host (tasks/prune.py).
#
# usage: prune.sh images
#            "image ID SIZE LAYER..." for every image (SIZE in bytes, as docker counts it: layers it shares
#            with other images included; its layers' diff ids, base first), then "container IMAGE_ID" for the
#            image of every container, running or not
#        prune.sh env-sizes ENV_DIR ENV...        (as the env dir's owner)
#            "env ID BYTES": what removing envs/ENV... and collecting the store frees, a file counted when
#            every link to it but the store's own (objects/) is in those envs; a file shared by several of
#            them is counted once, with the first that names it (the others print 0 or nothing for it)
#        prune.sh remove DIR PATH...              (as DIR's owner)
#            removes each PATH, relative to DIR, in the order given (tasks/prune.py checks every name: none
#            starts with "/" or holds "..", and refused here too)
#        prune.sh remove-images ID...
#            `docker image rm` of each image by its id, never forced (an image under several tags goes once
#            each of its tags is removed, which docker does for the id only when forced): "removed ID",
#            "gone ID" (no longer on the host), or "kept ID WHY" (docker refused; the exit status is 1 then)
set -eu
command=$1
shift
case $command in
images)
    images=$(docker image ls -q --no-trunc)
    containers=$(docker ps -aq --no-trunc)
    # an image or container removed since it was listed is left out (docker inspect says so on stderr)
    printf '%s\n' "$images" | sort -u | xargs -r docker image inspect -f 'image {{.Id}} {{.Size}} {{range .RootFS.Layers}}{{.}} {{end}}' 2>/dev/null || true
    printf '%s\n' "$containers" | xargs -r docker inspect -f 'container {{.Image}}' 2>/dev/null || true
    ;;
env-sizes)
    cd "$1"
    shift
    count=$#
    while [ "$count" -gt 0 ]; do
        set -- "$@" "envs/$1"
        shift
        count=$((count - 1))
    done
    [ $# -gt 0 ] || exit 0
    # inode, links, size per file; a start point that is a link is not followed (find -P)
    find "$@" -type f -printf '%H %i %n %s\n' 2>/dev/null | awk '
        !($2 in left) { first[$2] = $1; size[$2] = $4; left[$2] = $3 }
        { left[$2]-- }
        END {
            for (inode in left) if (left[inode] <= 1) freed[first[inode]] += size[inode]
            for (env in freed) printf "env %s %.0f\n", substr(env, 6), freed[env]
        }'
    ;;
remove)
    cd "$1"
    shift
    for path; do
        case $path in
            "" | /* | *..*)
                echo "prune.sh: refusing to remove $path" >&2
                exit 2
                ;;
        esac
    done
    [ $# -eq 0 ] || rm -rf -- "$@"
    ;;
remove-images)
    status=0
    for id; do
        if ! docker image inspect -f '{{.Id}}' -- "$id" >/dev/null 2>&1; then
            echo "gone $id"
            continue
        fi
        if ! said=$(docker image rm -- "$id" 2>&1); then
            case $said in
                *"multiple repositories"*)
                    for tag in $(docker image inspect -f '{{range .RepoTags}}{{.}} {{end}}' -- "$id"); do
                        said=$(docker image rm -- "$tag" 2>&1) || break
                    done
                    ;;
            esac
        fi
        if docker image inspect -f '{{.Id}}' -- "$id" >/dev/null 2>&1; then
            echo "kept $id $(printf '%s' "$said" | tr '\n' ' ' | head -c 300)"
            status=1
        else
            echo "removed $id"
        fi
    done
    exit "$status"
    ;;
*)
    echo "prune.sh: unknown command $command" >&2
    exit 2
    ;;
esac
