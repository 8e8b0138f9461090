#!/bin/sh
# Put the compose project staged in COMPOSE_DIR/STAGE/project.tar in place (STAGE: this run's own,
# stage_project.sh). Run holding the compose directory's lock (stack_locked.sh): no step of an earlier run is
# still at work, so what earlier runs left (stages, image uploads, a fan-out's image folders) is removed first.
# The project is unpacked in STAGE (modes as the deploy set them) and checked with compose itself; then the
# kind of every name, before anything moves: where this push puts a file the host may hold a file, or a
# directory holding only files the previous push placed (they go); where it puts a directory, a directory, or
# a file the previous push placed (it goes). Anything else stops the install with nothing changed. Then what
# the previous push placed and this one does not is removed, each file moved into place (one rename each),
# and .mlstack-files written last: it records a complete push.
# usage: install_project.sh COMPOSE_DIR STAGE
set -eu
cd "$1"
stage=$2
for leftover in .next .next-* .image.tar.gz .image-*.tar.gz .image-*.seed .image-*.swarm; do
    if [ "$leftover" != "$stage" ]; then rm -rf -- "$leftover"; fi
done
mkdir "$stage/tree"
tar -xf "$stage/project.tar" -C "$stage/tree" --no-same-owner
(cd "$stage/tree" && docker compose config -q)
(cd "$stage/tree" && find . -type f ! -path ./.mlstack-files) >"$stage/new"
# what the previous push placed, as ./PATH: only relative names the deploy wrote (no `# mode` line)
if [ -f .mlstack-files ] && [ ! -L .mlstack-files ]; then
    sed -n 's/^[0-9a-f]\{64\}  //p' .mlstack-files | grep -v -e '^/' -e '\.\.' | sed 's|^|./|' >"$stage/placed"
else
    : >"$stage/placed"
fi

placed() { grep -qxF -- "$1" "$stage/placed"; }

conflict() {
    printf 'install_project.sh: %s in %s is %s where the project has %s; nothing was changed: move it away, then run again\n' \
        "${1#./}" "$PWD" "$2" "$3" >&2
    exit 1
}

while read -r path; do
    dir=$(dirname -- "$path")
    while [ "$dir" != . ]; do
        if [ -L "$dir" ] || { [ -e "$dir" ] && [ ! -d "$dir" ] && ! placed "$dir"; }; then
            conflict "$dir" "not a directory of the deploy's" "a directory"
        fi
        dir=$(dirname -- "$dir")
    done
    if [ -L "$path" ]; then conflict "$path" "a link" "a file"; fi
    if [ -d "$path" ] && find "$path" ! -type d | grep -qvxF -f "$stage/placed"; then
        conflict "$path" "a directory holding files the deploy did not place" "a file"
    fi
done <"$stage/new"

while read -r path; do  # a directory someone made where a placed file was is theirs: left as it is
    if [ ! -f "$stage/tree/$path" ] && { [ -L "$path" ] || [ ! -d "$path" ]; }; then rm -f -- "$path"; fi
done <"$stage/placed"
while read -r path; do
    if [ -d "$path" ]; then find "$path" -depth -type d -empty -delete; fi  # emptied above: the file's place
    mkdir -p -- "$(dirname -- "$path")"
    mv -f -- "$stage/tree/$path" "$path"
done <"$stage/new"
mv -f -- "$stage/tree/.mlstack-files" .mlstack-files
rm -rf -- "$stage"
