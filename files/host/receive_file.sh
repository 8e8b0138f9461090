#!/bin/sh
# Write stdin (the deploy's upload stream) to DEST as a new file with MODE (read/write bits only). O_EXCL
# creation: the write never goes through a link or into a FIFO planted at that name, whoever owns the
# directory; the file is created with MODE (through the umask), so no later chmod can follow a link swapped
# in at that name once it is written.
# usage: receive_file.sh DEST MODE
set -eu
dest=$1
mode=$2
case $mode in
    0[0246][0246][0246]) ;;
    *) echo "receive_file.sh: mode $mode: expected read/write bits only (0600, 0644, ...)" >&2; exit 2 ;;
esac
rm -f -- "$dest"
(umask "$(printf '%04o' $((0666 & ~mode)))" && dd of="$dest" conv=excl bs=1M status=none)
