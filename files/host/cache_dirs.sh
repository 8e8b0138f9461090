#!/bin/sh
# Make the model cache's directories, parents first, with MODE; whatever stands where one belongs (a
# link its owner planted, a file) is removed first. Run as the cache's owner. Each DIR lies below the
# first one's parent (the cache, in a directory root alone can write) and is reached from there one
# name at a time, each step checked to have arrived where it should: a link swapped in at any moment
# stops the program before it changes anything through it (chmod acts on the directory it stands in).
# usage: cache_dirs.sh MODE DIR...
set -eu
mode=$1
shift
top=${1%/*}
physical_top=$(cd -P -- "$top" && pwd -P)
for dir in "$@"; do
    (
        cd -P -- "$physical_top"
        here=$physical_top
        set -f
        IFS=/
        for name in ${dir#"$top"/}; do
            if [ -L "$name" ] || { [ -e "$name" ] && [ ! -d "$name" ]; }; then rm -f -- "$name"; fi
            [ -d "$name" ] || mkdir -- "$name"
            cd -P -- "$name"
            here=$here/$name
            if [ "$(pwd -P)" != "$here" ]; then
                echo "cache_dirs.sh: $dir was swapped for a link while it was made; nothing was changed through it" >&2
                exit 1
            fi
        done
        chmod "$mode" .
    )
done
