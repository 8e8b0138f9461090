#!/bin/sh
# The HF cache's repo folders this deploy manages: blobs (size, name), snapshots and their links, trees,
# refs, the room left.
# With HASHES=1 every blob is hashed as its name says: sha256 (64 hex) or git's blob sha1 (40 hex).
# The folders may belong to a non-root user, who may plant links: a link where a folder belongs
# is not entered (find's starting points are not followed), files are read without following a
# link or blocking on a FIFO (dd iflag=nofollow,nonblock), names holding a newline are skipped and
# a ref is printed only when it holds a commit (40 bytes of hex), so no content can forge a record.
# usage: model_cache_probe.sh CACHE_DIR HASHES FOLDER...
set -eu
read_file() { dd if="$1" iflag=nofollow,nonblock bs=1M status=none 2>/dev/null || true; }
cache_dir=$1
hashes=$2
shift 2
nl='
'
place=$cache_dir
while [ ! -e "$place" ]; do place=$(dirname "$place"); done
echo "free $(df -Pk -- "$place" | awk 'NR==2 {print $4}')"
if [ -L "$cache_dir/hub" ]; then exit 0; fi
cd "$cache_dir/hub" 2>/dev/null || exit 0
for folder in "$@"; do
    if [ ! -d "$folder" ] || [ -L "$folder" ]; then continue; fi
    echo "repo $folder"
    find "$folder/blobs" -mindepth 1 -maxdepth 1 -type f ! -name "*$nl*" -printf 'blob %s %f\n' 2>/dev/null || true
    find "$folder/snapshots" -mindepth 1 -maxdepth 1 ! -name "*$nl*" -printf 'snapshot %y %f\n' 2>/dev/null || true
    find "$folder/snapshots" -mindepth 2 -type l ! -path "*$nl*" -printf 'link %l %P\n' 2>/dev/null || true
    find "$folder/trees" -mindepth 1 -maxdepth 1 -type f ! -name "*$nl*" -printf 'tree %f\n' 2>/dev/null || true
    find "$folder/refs" -type f -size 40c ! -path "*$nl*" -printf '%P\n' 2>/dev/null | while read -r ref; do
        commit=$(read_file "$folder/refs/$ref" | head -c 40)
        case $commit in
            *[!0-9a-f]* | "") ;;
            *) [ ${#commit} -eq 40 ] && echo "ref $ref $commit" ;;
        esac
    done
    if [ "$hashes" != 1 ] || [ -L "$folder/blobs" ]; then continue; fi
    for blob in "$folder"/blobs/*; do
        if [ ! -f "$blob" ] || [ -L "$blob" ]; then continue; fi
        name=${blob##*/}
        case $name in *"$nl"*) continue ;; esac
        case ${#name} in
            64) echo "hash $name $(read_file "$blob" | sha256sum | cut -c1-64)" ;;
            40) echo "hash $name $( { printf 'blob %s\000' "$(stat -c %s -- "$blob")"; read_file "$blob"; } | sha1sum | cut -c1-40)" ;;
        esac
    done
done
exit 0
