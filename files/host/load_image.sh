#!/bin/sh
# An image archive at INCOMING: checked against its SHA256 (a copy that does not match is removed, and the
# deploy says so), then `docker load`ed and removed.
# usage: load_image.sh INCOMING SHA256 REFERENCE
#        load_image.sh --seed INCOMING SHA256 REFERENCE
#            the same, but INCOMING stays: the fan-out's seed serves it to its peers (tasks/host/fanout.py)
#        load_image.sh --swarm WORK INCOMING SHA256 REFERENCE
#            INCOMING, fetched by a fan-out swarm into its staging folder WORK, checked and loaded alike; WORK is
#            removed whatever happens. Exits 1 (quietly) when nothing arrived: the deploy then sends it directly.
set -u
mode=
case $1 in
--seed) mode=seed && shift ;;
--swarm) mode=swarm work=$2 && shift 2 && trap 'rm -rf -- "$work"' EXIT ;;
esac
incoming=$1
sha256=$2
reference=$3
if [ "$mode" = swarm ] && { [ ! -f "$incoming" ] || [ -L "$incoming" ]; }; then
    exit 1
fi
if ! printf '%s  %s\n' "$sha256" "$incoming" | sha256sum --check --quiet --strict -; then
    rm -f -- "$incoming"
    printf 'image %s: the archive does not match its sha256; it was removed, run the deploy again\n' "$reference" >&2
    exit 1
fi
docker load -q -i "$incoming" || exit 1
[ "$mode" = seed ] || rm -f -- "$incoming"
[ "$mode" != swarm ] || echo "image $reference loaded from the swarm"
