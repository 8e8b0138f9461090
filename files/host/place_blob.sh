#!/bin/sh
# A model file received or downloaded at INCOMING becomes the blob at FINAL (a rename: never seen half
# written), once it is a regular file with SIZE bytes and hash BLOB (sha256 for 64 hex digits, else git's
# blob sha1). It is read without following a link or blocking on a FIFO (dd iflag=nofollow,nonblock); a
# copy that does not match is removed. Run as the cache's owner.
# usage: place_blob.sh INCOMING FINAL SIZE BLOB PATH
#        place_blob.sh --swarm WORK [INCOMING FINAL SIZE BLOB PATH]...
#            the blobs a fan-out swarm fetched into WORK (tasks/host/fanout.py): each INCOMING that arrived is
#            checked and placed alike ("taken BLOB", or "dropped BLOB" and removed: the deploy sends it
#            directly); then WORK is removed and a summary said. Exits 0 whatever arrived.
set -u
hashed() {  # the hash of $incoming, of the kind $blob names, read as said above
    if [ "${#blob}" -eq 64 ]; then
        dd if="$incoming" iflag=nofollow,nonblock bs=1M status=none | sha256sum | cut -c1-64
    else
        { printf 'blob %s\000' "$size"; dd if="$incoming" iflag=nofollow,nonblock bs=1M status=none; } |
            sha1sum | cut -c1-40
    fi
}
placed() {  # $incoming renamed to $final when it is what $size and $blob say; else removed
    if [ -f "$incoming" ] && [ ! -L "$incoming" ] && [ "$(stat -c %s "$incoming")" = "$size" ] \
            && [ "$(hashed)" = "$blob" ]; then
        mv -f "$incoming" "$final"
    else
        rm -f "$incoming"
        return 1
    fi
}
if [ "$1" != --swarm ]; then
    incoming=$1 final=$2 size=$3 blob=$4 path=$5
    placed && exit 0
    printf 'model file %s: the copy does not match its size or hash; removed, run again\n' "$path" >&2
    exit 1
fi
work=$2
shift 2
taken=0 dropped=0 bytes=0
while [ "$#" -ge 5 ]; do
    incoming=$1 final=$2 size=$3 blob=$4
    shift 5
    if [ -e "$incoming" ] || [ -L "$incoming" ]; then
        if placed; then
            echo "taken $blob"
            taken=$((taken + 1)) bytes=$((bytes + size))
        else
            echo "dropped $blob"
            dropped=$((dropped + 1))
        fi
    fi
done
rm -rf -- "$work"
awk -v n="$taken" -v b="$bytes" -v d="$dropped" \
    'BEGIN { printf "%d file(s), %.1f MB, taken into the cache from the swarm; %d dropped\n", n, b / 1e6, d }'
