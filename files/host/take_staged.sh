#!/bin/sh
# A model file huggingface_hub downloaded on the host into the staging cache STAGING: its snapshot path
# STAGED is a link to its blob, which is moved to INCOMING (for place_blob.sh to check and put in place).
# The link is resolved once and must lead to a regular file inside STAGING: the download ran in a
# container, and a link it left pointing elsewhere is not ours to move. Run as the cache's owner.
# usage: take_staged.sh STAGING STAGED INCOMING
set -eu
staging=$1
staged=$2
incoming=$3
refuse() {
    printf 'model file %s: the download left no file of its own in %s\n' "$staged" "$staging" >&2
    exit 1
}
root=$(readlink -e -- "$staging") || refuse
blob=$(readlink -e -- "$staged") || refuse
[ -f "$blob" ] || refuse
case $blob in
    "$root"/*) mv -f -- "$blob" "$incoming" ;;
    *) refuse ;;
esac
