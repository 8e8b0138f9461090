#!/bin/sh
# A model file received or downloaded at INCOMING becomes the blob at FINAL (a rename: never seen half
# written), once it is a regular file with SIZE bytes and hash BLOB (sha256 for 64 hex digits, else git's
# blob sha1). It is read without following a link or blocking on a FIFO (dd iflag=nofollow,nonblock); a
# copy that does not match is removed. Run as the cache's owner.
# usage: place_blob.sh INCOMING FINAL SIZE BLOB PATH
set -u
incoming=$1
final=$2
size=$3
blob=$4
path=$5
read_blob() {
    dd if="$incoming" iflag=nofollow,nonblock bs=1M status=none
}
hashed() {
    if [ "${#blob}" -eq 64 ]; then
        read_blob | sha256sum | cut -c1-64
    else
        { printf 'blob %s\000' "$size"; read_blob; } | sha1sum | cut -c1-40
    fi
}
if ! { [ -f "$incoming" ] && [ ! -L "$incoming" ] && [ "$(stat -c %s "$incoming")" = "$size" ] \
        && [ "$(hashed)" = "$blob" ]; }; then
    rm -f "$incoming"
    printf 'model file %s: the copy does not match its size or hash; removed, run again\n' "$path" >&2
    exit 1
fi
mv -f "$incoming" "$final"
