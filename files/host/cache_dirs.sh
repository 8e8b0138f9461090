#!/bin/sh
# Make the model cache's directories, parents first, with MODE; whatever stands where one belongs (a
# link its owner planted, a file) is removed first. Run as the cache's owner.
# usage: cache_dirs.sh MODE DIR...
set -eu
mode=$1
shift
for dir in "$@"; do
    if [ -L "$dir" ] || { [ -e "$dir" ] && [ ! -d "$dir" ]; }; then rm -f -- "$dir"; fi
    mkdir -p -- "$dir"
    chmod "$mode" -- "$dir"
done
