#!/bin/sh
# The ML env dir: room left for it, the host's arch and runtime base image, the active env, our entries,
# the envs the store made (their own info file is linked from objects/ too), and the envs a container
# on the host mounts (any container, running or not), with its compose project. With HASH_AS (uid:gid,
# the env dir's owner; "" for none) every object of the store is hashed as that user, so root never
# follows what the owner plants there: one whose content differs from its name is printed as damaged; and
# every tree of the store is listed, entry by entry (kind, path, and the object a file is, by its inode,
# "-" for none, or a link's target), for the control node to compare with the env's manifest; a name (or
# link target) that cannot be listed on one line is printed as odd. An env swapped for a link is printed
# as swapped on every run (never as an env of the store).
# Names holding a newline are skipped (the parser takes only the names this deploy writes), so no
# name or link target can pose as a record.
# usage: ml_env_probe.sh ENV_DIR BASE_IMAGE HASH_AS
set -eu
env_dir=$1
image=$2
hash_as=$3
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
    case $entry in envs/*) if [ -L "$entry" ]; then echo "swapped $entry" && continue; fi ;; esac
    if [ -e "$entry" ]; then echo "entry $(stat -c %Y -- "$entry") $entry"; fi
    info=$entry/.mlstack-env.json
    if [ -f "$info" ] && [ ! -L "$info" ] && [ "$(stat -c %h -- "$info")" -gt 1 ]; then echo "stored $entry"; fi
done
if [ -n "$hash_as" ] && [ -d objects ] && [ ! -L objects ]; then
    as_owner=""
    [ "$hash_as" = 0:0 ] || as_owner="setpriv --reuid=${hash_as%:*} --regid=${hash_as#*:} --clear-groups --"
    # each object read without following a link or blocking on a FIFO the owner swaps in after find
    # listed it (dd iflag=nofollow,nonblock): such an object hashes as empty, so it is damaged
    # shellcheck disable=SC2016 # the inner script's own variables
    $as_owner find objects -maxdepth 1 -type f -name '*-*' ! -name "*$nl*" -exec sh -c 'for path; do
            sum=$(dd if="$path" iflag=nofollow,nonblock bs=1M status=none 2>/dev/null | sha256sum)
            echo "${sum%% *} $path"
        done' sh '{}' + 2>/dev/null |
        while read -r sum path; do
            name=${path#objects/}
            [ "${name%-*}" = "$sum" ] || echo "damaged $name"
        done
    # shellcheck disable=SC2016 # the inner script's own variables
    $as_owner sh -c 'nl=$1 tab=$2
        find objects -maxdepth 1 -type f -name "*-*" -printf "%i %f\n"
        echo ==
        for tree in envs/env-*; do
            case $tree in *.tmp-*|*"$nl"*) continue ;; esac
            [ -d "$tree" ] && [ ! -L "$tree" ] || continue
            id=${tree#envs/}
            find "$tree" -mindepth 1 \( -name "*$nl*" -o -name "*$tab*" -o -lname "*$nl*" \) -printf "odd $id\n"
            find "$tree" -mindepth 1 ! -name "*$nl*" ! -name "*$tab*" ! -lname "*$nl*" -printf "$id %y %i %P\t%l\n"
        done' sh "$nl" "$tab" 2>/dev/null |
        awk -v tab="$tab" '
            phase == 0 && $0 == "==" { phase = 1; next }
            phase == 0 { objects[$1] = $2; next }
            $1 == "odd" { print "odd " $2; next }
            {
                split($0, head, " "); rest = substr($0, length(head[1] head[2] head[3]) + 4)
                cut = index(rest, tab); path = substr(rest, 1, cut - 1); ref = substr(rest, cut + 1)
                if (head[2] == "f") ref = (head[3] in objects) ? objects[head[3]] : "-"
                print "tree " head[1] tab head[2] tab path tab ref
            }'
fi
exit 0
