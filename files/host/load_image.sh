#!/bin/sh
# The image archive just received at INCOMING: checked against its SHA256 (a copy that does not match
# is removed, and the deploy says so), then `docker load`ed and removed.
# usage: load_image.sh INCOMING SHA256 REFERENCE
set -u
incoming=$1
sha256=$2
reference=$3
if ! printf '%s  %s\n' "$sha256" "$incoming" | sha256sum --check --quiet --strict -; then
    rm -f -- "$incoming"
    printf 'image %s: the archive does not match its sha256; it was removed, run the deploy again\n' "$reference" >&2
    exit 1
fi
docker load -q -i "$incoming" && rm -f -- "$incoming"
