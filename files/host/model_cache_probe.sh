#!/bin/sh
# The HF cache's repo folders this deploy manages: blobs (size, name), snapshots, trees, refs, the room left.
# With HASHES=1 every blob is hashed as its name says: sha256 (64 hex) or git's blob sha1 (40 hex).
# usage: model_cache_probe.sh CACHE_DIR HASHES FOLDER...
set -eu
cache_dir=$1
hashes=$2
shift 2
place=$cache_dir
while [ ! -e "$place" ]; do place=$(dirname "$place"); done
echo "free $(df -Pk "$place" | awk 'NR==2 {print $4}')"
cd "$cache_dir/hub" 2>/dev/null || exit 0
for folder in "$@"; do
    [ -d "$folder" ] || continue
    echo "repo $folder"
    find "$folder/blobs" -mindepth 1 -maxdepth 1 -printf 'blob %s %f\n' 2>/dev/null || true
    find "$folder/snapshots" -mindepth 1 -maxdepth 1 -printf 'snapshot %f\n' 2>/dev/null || true
    find "$folder/trees" -mindepth 1 -maxdepth 1 -printf 'tree %f\n' 2>/dev/null || true
    find "$folder/refs" -type f -printf 'ref %P ' -exec head -c 64 {} \; -printf '\n' 2>/dev/null || true
    [ "$hashes" = 1 ] || continue
    for blob in "$folder"/blobs/*; do
        name=${blob##*/}
        case ${#name} in
            64) echo "hash $name $(sha256sum < "$blob" | cut -c1-64)" ;;
            40) echo "hash $name $( { printf 'blob %s\000' "$(stat -c %s "$blob")"; cat "$blob"; } | sha1sum | cut -c1-40)" ;;
        esac
    done
done
exit 0
