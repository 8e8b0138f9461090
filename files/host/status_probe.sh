#!/bin/sh
# What `mlstack status` reads on a host besides the models, GPUs and releases, changing nothing there, in few
# docker calls (one `docker ps`: on a fleet sharing a control node's cores every docker CLI start counts):
# - the deploy lock (files/host/deploy_lock.sh): "lock free", "lock held WHO" (the holder line the deploy
#   wrote) or "lock unknown: WHY". It is read from /proc/locks, never taken, not even for an instant (a
#   `flock -n` test would hold it while it looks, and a deploy starting then would be refused); only where
#   /proc/locks cannot be read, or names the lock's inode on another device (a file system whose stat device
#   is not its lock device), does a `flock -n` on a read-only descriptor tell.
# - "project NAME": the compose project COMPOSE_DIR/.env names.
# - "files SHA256": the sha256 of COMPOSE_DIR's .mlstack-files and .env.digest one after the other, as a
#   release's `files` is made (tasks/host/releases.py); nothing without them.
# - the files the last push recorded in .mlstack-files whose content differs now: "file PATH: FAILED" as
#   `sha256sum -c` says it (edited by hand, or missing).
# - whether COMPOSE_DIR/.env is still the current release's copy: "dotenv same", "dotenv differs",
#   "dotenv no-release" or "dotenv unknown" (the release cannot be read: not root).
# - the ML env: "env-active ID" (where `active` points) and "env ID" for each entry of envs/.
# - "container PROJECT|SERVICE|STATE|STATUS|ONEOFF" for every container of a compose project, or
#   "docker-failed" when docker cannot list them.
# usage: status_probe.sh LOCK_DIR COMPOSE_DIR RELEASES_DIR ENV_DIR
set -eu
lock_dir=$1
compose=$2
releases=$3
env_dir=$4
lock=$lock_dir/deploy.lock

holder() { echo "lock held $(head -n 1 -- "$lock" | head -c 300)"; }

if [ ! -e "$lock" ] && [ ! -L "$lock" ]; then
    echo "lock free"  # never taken on this host since it booted
elif [ -L "$lock_dir" ] || [ -L "$lock" ] || [ ! -f "$lock" ]; then
    echo "lock unknown: $lock is not a regular file"
elif [ -r /proc/locks ]; then
    dev=$(stat -c %d -- "$lock")
    inode=$(stat -c %i -- "$lock")
    # /proc/locks names a file MAJOR:MINOR:INODE (hex device numbers); stat gives the device as one number.
    want=$(printf '%02x:%02x:%s' $(((dev >> 8) & 0xfff)) $(((dev & 0xff) | ((dev >> 12) & 0xfff00))) "$inode")
    # waiters ("N: -> FLOCK …") and other kinds of lock are not the holder; "maybe": the same inode on another
    # device (a file system whose stat device is not its lock's)
    held=$(awk -v want="$want" -v inode="$inode" '
        $2 == "FLOCK" && $6 == want { found = 1; exit }
        $2 == "FLOCK" { split($6, id, ":"); if (id[3] == inode) maybe = 1 }
        END { print found ? "yes" : maybe ? "maybe" : "no" }' /proc/locks)
    if [ "$held" = maybe ] && (exec 9<"$lock" && flock -n 9); then held=no; fi
    if [ "$held" = no ]; then echo "lock free"; else holder; fi
elif (exec 9<"$lock" && flock -n 9); then
    echo "lock free"
else
    holder
fi

if [ -f "$compose/.env" ] && [ ! -L "$compose/.env" ]; then
    sed -n 's/^COMPOSE_PROJECT_NAME="\{0,1\}\([a-z0-9_-]*\)"\{0,1\}$/project \1/p' -- "$compose/.env"
fi
if [ -f "$compose/.mlstack-files" ] && [ ! -L "$compose/.mlstack-files" ] && [ -f "$compose/.env.digest" ] &&
    [ ! -L "$compose/.env.digest" ]; then
    echo "files $(cat -- "$compose/.mlstack-files" "$compose/.env.digest" | sha256sum | cut -c1-64)"
fi
if [ -f "$compose/.mlstack-files" ] && [ ! -L "$compose/.mlstack-files" ]; then
    (cd -- "$compose" && { sha256sum -c --quiet .mlstack-files 2>/dev/null || true; }) | sed 's/^/file /'
fi

if [ -d "$releases" ] && [ ! -x "$releases" ]; then
    echo "dotenv unknown"
elif [ ! -L "$releases/current" ]; then
    echo "dotenv no-release"
elif [ ! -r "$releases/current/project/.env" ]; then
    echo "dotenv unknown"
elif cmp -s -- "$compose/.env" "$releases/current/project/.env"; then
    echo "dotenv same"
else
    echo "dotenv differs"
fi

if [ -L "$env_dir/active" ]; then echo "env-active $(readlink -- "$env_dir/active" | head -n 1)"; fi
for entry in "$env_dir"/envs/env-*; do
    if [ -d "$entry" ] && [ ! -L "$entry" ]; then echo "env ${entry##*/}"; fi
done

format='container {{.Label "com.docker.compose.project"}}|{{.Label "com.docker.compose.service"}}|{{.State}}'
format="$format|{{.Status}}|{{.Label \"com.docker.compose.oneoff\"}}"
docker ps -a --filter label=com.docker.compose.project --format "$format" 2>/dev/null || echo docker-failed
