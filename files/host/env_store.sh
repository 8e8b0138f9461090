#!/bin/sh
# The ML env store on a host (tasks/host/ml_env.py): objects/<sha256>-<mode> holds every file of every
# env once; envs/<id>/ is a tree of hard links to them. Run as the env dir's owner, in ENV_DIR.
#
# usage: env_store.sh list ENV_DIR
#            the objects the store holds, a name a line
#        env_store.sh receive ENV_DIR ENV MARK REMOVALS ENTRIES
#            makes envs/ENV from nothing but stdin, the three parts tasks/control/env_store.py
#            transfer_stream writes: the paths to remove (none here) and the entries of the control
#            node's manifest (of REMOVALS and ENTRIES bytes), then the objects to add, read by tar to the
#            end straight from stdin (staged in incoming/MARK, each checked against its name before it
#            enters objects/); envs/ENV.tmp-MARK is renamed into place only once it is complete (over a
#            link standing at envs/ENV: never a tree of ours). No other env's tree is copied, so nothing
#            planted in one is carried into the next.
#        env_store.sh mend ENV_DIR ENV MARK REMOVALS ENTRIES
#            the same stream, applied to envs/ENV in place: the paths that differ from the manifest are
#            removed and its entries made again (a container that mounts the env sees the mended tree)
#        env_store.sh repair ENV_DIR MARK
#            stdin: a tar of good copies of damaged objects; every env path linked to a
#            damaged object is linked to its good copy (a new file, put in place by a rename)
#        env_store.sh collect ENV_DIR
#            removes the objects no env links to (a link count of 1)
#        env_store.sh adopt ENV_DIR MARK
#            the objects a fan-out swarm fetched into incoming/MARK/objects (tasks/host/fanout.py): each one
#            whose content is what its name says (read as check_staged reads) gets its mode and time and
#            enters objects/; any other is removed, and the deploy sends it directly. Says what it took.
set -eu
command=$1
cd "$2"
if [ "$command" = list ] || [ "$command" = collect ]; then
    [ -d objects ] || exit 0
    if [ "$command" = list ]; then
        find objects -maxdepth 1 -type f -name '*-*' -printf '%f\n'
    else
        find objects -maxdepth 1 -type f -name '*-*' -links 1 -delete
    fi
    exit 0
fi
if [ "$command" = adopt ]; then
    work=incoming/$3
    if [ -L "$work" ] || [ -L "$work/objects" ] || [ ! -d "$work/objects" ]; then
        echo "nothing arrived"
        exit 0
    fi
    mkdir -p objects
    # shellcheck disable=SC2016 # the inner script's own variables
    said=$(cd "$work/objects" && find . -maxdepth 1 -type f -name '*-*' -printf '%f\n' |
        xargs -r -P "$(nproc)" -n 256 sh -c 'for name; do
            case ${name##*-} in [0-7][0-7][0-7] | [0-7][0-7][0-7][0-7]) ;; *) echo dropped; continue ;; esac
            sum=$(dd if="$name" iflag=nofollow,nonblock bs=1M status=none 2>/dev/null | sha256sum)
            if [ "${sum%% *}" = "${name%-*}" ] && chmod "${name##*-}" "$name" && touch -m -d @1577836800 "$name" &&
                size=$(stat -c %s "$name") && mv -n -- "$name" ../../../objects/; then
                echo "taken $size"
            else
                echo dropped
            fi
        done' sh)
    rm -rf -- "$work"
    echo "$said" | awk '$1 == "taken" { n++; b += $2 } $1 == "dropped" { d++ }
        END { printf "%d object(s), %.1f MB, taken into the store from the swarm; %d dropped\n", n, b / 1e6, d }'
    exit 0
fi
made=
if [ "$command" = receive ] || [ "$command" = mend ]; then
    env=$3 mark=$4 removals=$5 entries=$6
    tree=envs/$env
    [ "$command" = mend ] || { tree=envs/$env.tmp-$mark && made=$tree; }
else
    mark=$3
fi
staged=incoming/$mark
fail() {
    rm -rf -- "$staged" ${made:+"$made"}
    echo "$1" >&2
    exit 1
}
# Every staged object holds what its name says: each is hashed, on every core, as read without following
# a link or blocking on a FIFO swapped in after find listed it (dd iflag=nofollow,nonblock: such an
# object hashes as empty and fails); a name of another shape fails the check too.
check_staged() {
    list=$PWD/$staged/.check
    (cd "$staged" && find . -maxdepth 1 -type f -name '*-*' -printf '%f\n') >"$list"
    [ -s "$list" ] || return 0
    split -e -n "l/$(nproc)" "$list" "$list."
    # shellcheck disable=SC2016 # the inner script's own variables
    said=$(cd "$staged" && printf '%s\n' "$list".* | xargs -P "$(nproc)" -n 1 sh -c 'while read -r name; do
            sum=$(dd if="$name" iflag=nofollow,nonblock bs=1M status=none 2>/dev/null | sha256sum)
            [ "${sum%% *}" = "${name%%-*}" ] || { echo "$name: FAILED"; exit 1; }
        done <"$1"' sh 2>&1) ||
        fail "an object arrived damaged ($(echo "$said" | head -n 1))"
    rm -f -- "$list" "$list".*
}
# The objects, the rest of stdin, into the staging folder (tar's first complaint, if any, is the reason given).
receive_objects() {
    said=$(tar -x -p --no-same-owner -C "$staged" -f - 2>&1) ||
        fail "the objects did not arrive whole ($(echo "$said" | head -n 1))"
}
rm -rf -- "$staged" ${made:+"$made"}
mkdir -p objects
mkdir -m 0700 "$staged"

if [ "$command" = repair ]; then
    receive_objects
    check_staged
    for good in "$staged"/*; do
        object=${good##*/}
        # shellcheck disable=SC2016 # the inner script's own variables
        find envs -type f -samefile "objects/$object" -exec sh -c \
            'new=$1 mark=$2; shift 2; for path; do ln -- "$new" "$path.repair-$mark" && mv -T -- "$path.repair-$mark" "$path"; done' \
            sh "$good" "$mark" '{}' +
        mv -f -- "$good" "objects/$object"
    done
    rm -rf -- "$staged"
    exit 0
fi

if [ "$command" = receive ]; then
    mkdir -m 0755 "$tree"
elif [ -L "$tree" ] || [ ! -d "$tree" ]; then
    fail "$tree is not a tree of the store"
else  # names no manifest holds, which the probe cannot list one a line
    nl='
'
    find "$tree" -mindepth 1 \( -name "*$nl*" -o -name "*$(printf '\t')*" -o -lname "*$nl*" \) -prune -exec rm -rf -- '{}' +
fi
head -c "$removals" >"$staged/.removals.gz"
head -c "$entries" >"$staged/.entries.tar.gz"
gzip -t "$staged/.removals.gz" "$staged/.entries.tar.gz" 2>/dev/null || fail "the stream ended early"
gzip -dc "$staged/.removals.gz" | (cd "$tree" && xargs -0 -r rm -rf --)
receive_objects
check_staged
# An object a run before ours put in place is kept (the tree links whichever is there, so a store stays one
# copy per content); a move that failed shows when the tree cannot link the object.
find "$staged" -maxdepth 1 -type f -name '*-*' -exec mv -n -t objects -- '{}' + || true
said=$(tar -xz -p --no-same-owner -f "$staged/.entries.tar.gz" 2>&1) || fail "its tree could not be made ($(echo "$said" | head -n 1))"
rm -rf -- "$staged"
[ "$command" = receive ] || exit 0
[ ! -L "envs/$env" ] || rm -f -- "envs/$env"
# complete: renamed into place (unless a run before ours, killed after its own check, finished it)
mv -T -- "$tree" "envs/$env" 2>/dev/null || { [ -d "envs/$env" ] && rm -rf -- "$tree"; }
