#!/bin/sh
# Who could swap what the deploy works on below each TREE: the first entry there that belongs to a uid other
# than WORKER (the uid the deploy works there as; TREE itself may also be root's: root alone can then add to
# it), or a directory that every user, or a group other than root's and GROUP, can write. One entry a tree at
# most (`-quit`); links are never followed (`-H`: only TREE itself, which lies in a directory of root's alone).
# Prints "INDEX UID GID MODE KIND PATH", a NUL and a newline for each entry found, INDEX being the tree's place
# among the arguments (from 0); a missing TREE is skipped.
# usage: owners_probe.sh [TREE WORKER GROUP]...
set -eu
index=0
while [ "$#" -ge 3 ]; do
    tree=$1 worker=$2 group=$3
    shift 3
    if [ -d "$tree" ]; then
        # An entry that vanishes while find reads the tree is reported on stderr; the walk goes on.
        find -H "$tree" \( -type d -perm -0002 -o -type d -perm -0020 ! -gid 0 ! -gid "$group" \
            -o ! -uid "$worker" \( ! -path "$tree" -o ! -uid 0 \) \) -printf "$index %U %G %m %y %p\\0\\n" -quit || true
    fi
    index=$((index + 1))
done
