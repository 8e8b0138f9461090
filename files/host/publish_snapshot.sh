#!/bin/sh
# The model cache's snapshot made visible in the repo folder REPO, as the cache's owner: one ACTION a run.
# usage: publish_snapshot.sh leftovers REPO PATH...
#            remove unfinished transfers and whatever stands where the snapshot goes (PATHs relative to REPO)
#        publish_snapshot.sh snapshot REPO COMMIT MARK [PATH TARGET]...
#            the links PATH -> TARGET made under snapshots/COMMIT.tmp-MARK, which is then renamed snapshots/COMMIT
#        publish_snapshot.sh relink REPO COMMIT [PATH TARGET]...
#            each link of snapshots/COMMIT made whole in place
#        publish_snapshot.sh ref REPO REVISION COMMIT
#            refs/REVISION names COMMIT: written under a temporary name, then renamed
set -eu
action=$1
repo=$2
shift 2
parent() {  # the directory holding PATH inside the tree TOP
    case $2 in
        */*) printf '%s/%s' "$1" "${2%/*}" ;;
        *) printf '%s' "$1" ;;
    esac
}
case $action in
    leftovers)
        cd "$repo"
        rm -rf -- "$@"
        ;;
    snapshot)
        commit=$1
        tmp=$repo/snapshots/$commit.tmp-$2
        shift 2
        rm -rf "$tmp"
        mkdir -p "$tmp"
        while [ "$#" -gt 0 ]; do
            mkdir -p "$(parent "$tmp" "$1")"
            ln -s "$2" "$tmp/$1"
            shift 2
        done
        mv -T "$tmp" "$repo/snapshots/$commit"
        ;;
    relink)
        final=$repo/snapshots/$1
        shift
        while [ "$#" -gt 0 ]; do
            mkdir -p "$(parent "$final" "$1")"
            ln -sfn "$2" "$final/$1"
            shift 2
        done
        ;;
    ref)
        ref=$repo/refs/$1
        mkdir -p "${ref%/*}"
        rm -f "$ref.tmp"
        printf %s "$2" | dd of="$ref.tmp" conv=excl status=none  # O_EXCL: never through a link swapped in
        mv -T "$ref.tmp" "$ref"
        ;;
    *)
        echo "publish_snapshot.sh: unknown action $action" >&2
        exit 2
        ;;
esac
