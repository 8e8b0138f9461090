#!/bin/sh
# Write stdin (the deploy's upload stream) to DEST as a new file with MODE. O_EXCL creation: the
# write never goes through a link or into a FIFO planted at that name, whoever owns the directory.
# usage: receive_file.sh DEST MODE
set -eu
dest=$1
mode=$2
rm -f -- "$dest"
(umask 077 && dd of="$dest" conv=excl bs=1M status=none)
chmod "$mode" -- "$dest"
