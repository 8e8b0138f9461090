#!/bin/sh
# The fan-out swarm on a host (tasks/host/fanout.py).
#
# usage: swarm.sh kit KIT SHA256                          (as the env dir's owner)
#            stdin: the kit (libtorrent's package and swarm_peer.py, a tar.gz), checked against SHA256, then
#            unpacked and renamed into place whole as the folder KIT (the peers mount it read-only)
#        swarm.sh stage ENV_DIR MARK TORRENT_BYTES        (as the env dir's owner)
#            stdin: the torrent (TORRENT_BYTES), then the objects the host holds (a name a line), written to
#            ENV_DIR/incoming/MARK/.torrent and .held; objects/ there is where a leecher's files arrive
#        swarm.sh peer KIT IMAGE PYTHON UID:GID ENV_DIR MARK ROLE LISTEN SECONDS STALL [PEER...]   (as root)
#            runs KIT/swarm_peer.py as UID:GID in a container of IMAGE on the host's network: ROLE seed serves
#            ENV_DIR/objects (mounted read-only), leech fetches into ENV_DIR/incoming/MARK/objects. It
#            listens on LISTEN only and knows only the PEERs. The container is removed when this ends,
#            however it ends; the peer's own deadline is SECONDS.
set -eu
command=$1
shift
case $command in
kit)
    kit=$1 sha256=$2
    kits=${kit%/*}
    mkdir -p "$kits"
    [ ! -d "$kit" ] || { cat >/dev/null; exit 0; }
    archive=$(mktemp "$kits/.kit.XXXXXXXX")
    unpacked=$(mktemp -d "$kits/.unpacked.XXXXXXXX")
    trap 'rm -rf -- "$archive" "$unpacked"' EXIT
    cat >"$archive"
    printf '%s  %s\n' "$sha256" "$archive" | sha256sum --check --quiet --strict - ||
        { echo "the fan-out kit arrived damaged (its sha256 differs)" >&2; exit 1; }
    tar -xz --no-same-owner -C "$unpacked" -f "$archive"
    chmod -R go-w,a+rX "$unpacked"
    mv -T -- "$unpacked" "$kit" 2>/dev/null || [ -d "$kit" ]
    ;;
stage)
    env_dir=$1 mark=$2 torrent=$3
    work=$env_dir/incoming/$mark
    rm -rf -- "$work"
    mkdir -m 0700 "$work" "$work/objects"
    head -c "$torrent" >"$work/.torrent"
    cat >"$work/.held"
    ;;
peer)
    kit=$1 image=$2 python=$3 ids=$4 env_dir=$5 mark=$6 role=$7 listen=$8 seconds=$9
    shift 9
    stall=$1
    shift
    case $env_dir$kit in *,*) echo "a path with a comma cannot be mounted: $env_dir" >&2; exit 1 ;; esac
    work=$env_dir/incoming/$mark
    name=mlstack-swarm-$mark
    peers=$*
    set -- --torrent /swarm/.torrent --save /swarm --listen "$listen" --expect "$#" --deadline "$seconds" \
        --stall "$stall"
    # shellcheck disable=SC2086 # IP:PORT words, one per peer
    for peer in $peers; do set -- "$@" --peer "$peer"; done
    store=
    if [ "$role" = seed ]; then
        set -- "$@" --seed
        store="--mount=type=bind,source=$env_dir/objects,target=/swarm/objects,readonly"
    else
        set -- "$@" --skip-from /swarm/.held
    fi
    # docker resolves a bind mount's source as root: each one must be the owner's own directory, reached without
    # a link (the owner could point one anywhere); what changes after this check is read only as the owner.
    for path in "$work" "$work/objects" "$kit" ${store:+"$env_dir/objects"}; do
        if [ "$(cd -P -- "$path" 2>/dev/null && pwd)" != "$path" ] || [ "$(stat -c %u:%g -- "$path")" != "$ids" ]; then
            echo "$path: not a directory of $ids reached without a link; the peer is not started" >&2
            exit 1
        fi
    done
    trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
    trap 'exit 143' TERM INT HUP
    docker rm -f "$name" >/dev/null 2>&1 || true  # a peer of this run's mark that an earlier try left
    # shellcheck disable=SC2086 # $store: one word or none
    docker run --rm --name "$name" --network host --user "$ids" --cap-drop ALL \
        --security-opt no-new-privileges --read-only --pull never --log-driver none \
        --mount "type=bind,source=$kit,target=/opt/mlstack-swarm,readonly" \
        --mount "type=bind,source=$work,target=/swarm" $store \
        --env PYTHONPATH=/opt/mlstack-swarm --env PYTHONDONTWRITEBYTECODE=1 \
        --entrypoint "$python" "$image" /opt/mlstack-swarm/swarm_peer.py "$@"
    ;;
*)
    echo "swarm.sh: unknown command $command" >&2
    exit 2
    ;;
esac
