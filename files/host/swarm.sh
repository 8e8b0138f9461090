#!/bin/sh
# The fan-out swarm on a host (tasks/host/fanout.py).
#
# usage: swarm.sh kit KIT SHA256                          (as root)
#            stdin: the kit (libtorrent's package and swarm_peer.py, a tar.gz), checked against SHA256, then
#            unpacked and renamed into place whole as the folder KIT, root's (every peer mounts it read-only)
#        swarm.sh stage WORK TORRENT_BYTES                  (as the files' owner)
#            stdin: the torrent (TORRENT_BYTES), then the files the host holds (a name a line), written to
#            WORK/.torrent and .held (WORK: this run's own, made afresh); WORK/objects is where a leecher's
#            files arrive
#        swarm.sh peer KIT IMAGE PYTHON UID:GID WORK STORE ROLE LISTEN SECONDS STALL [PEER...]   (as root)
#            runs KIT/swarm_peer.py as UID:GID in a container of IMAGE on the host's network, every capability
#            dropped: ROLE seed serves STORE (mounted read-only), leech fetches into WORK/objects. It listens
#            on LISTEN only and knows only the PEERs. The container is removed when this ends, however it
#            ends; the peer's own deadline is SECONDS.
set -eu
command=$1
shift
case $command in
kit)
    kit=$1 sha256=$2
    kits=${kit%/*}
    mkdir -p "$kits"
    if [ "$(cd -P -- "$kits" && pwd)" != "$kits" ] || [ "$(stat -c %u -- "$kits")" != 0 ]; then
        echo "$kits: not root's directory reached without a link; the kit is not placed" >&2
        exit 1
    fi
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
    work=$1 torrent=$2
    rm -rf -- "$work"
    mkdir -m 0700 "$work" "$work/objects"
    head -c "$torrent" >"$work/.torrent"
    cat >"$work/.held"
    ;;
peer)
    kit=$1 image=$2 python=$3 ids=$4 work=$5 store=$6 role=$7 listen=$8 seconds=$9
    shift 9
    stall=$1
    shift
    case $work$store$kit in *,*) echo "a path with a comma cannot be mounted: $work $store $kit" >&2; exit 1 ;; esac
    name=mlstack-swarm-${work##*/}
    peers=$*
    set -- --torrent /swarm/.torrent --save /swarm --listen "$listen" --expect "$#" --deadline "$seconds" \
        --stall "$stall"
    # shellcheck disable=SC2086 # IP:PORT words, one per peer
    for peer in $peers; do set -- "$@" --peer "$peer"; done
    served=
    if [ "$role" = seed ]; then
        set -- "$@" --seed
        served="--mount=type=bind,source=$store,target=/swarm/objects,readonly"
    else
        set -- "$@" --skip-from /swarm/.held
        store=
    fi
    # docker resolves a bind mount's source as root: each one must be the owner's own directory (the kit: root's
    # or the peer uid's, whose code it runs), reached without a link (the owner could point one anywhere); what
    # changes after this check is read only as the owner.
    for path in "$work" "$work/objects" ${store:+"$store"} "$kit"; do
        owner=$(stat -c %u:%g -- "$path" 2>/dev/null) || owner=
        [ "$path" != "$kit" ] || [ "${owner%:*}" != 0 ] || owner=$ids
        if [ "$(cd -P -- "$path" 2>/dev/null && pwd)" != "$path" ] || [ "$owner" != "$ids" ]; then
            echo "$path: not a directory of $ids reached without a link; the peer is not started" >&2
            exit 1
        fi
    done
    trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
    trap 'exit 143' TERM INT HUP
    # A peer still running now is an earlier run's, its connection lost before its trap ran (the deploy lock lets
    # one run at a time work on a host): it goes, whatever its run's mark.
    docker ps -aq --filter label=mlstack.swarm | xargs -r docker rm -f >/dev/null 2>&1 || true
    # shellcheck disable=SC2086 # $served: one word or none
    docker run --rm --name "$name" --label mlstack.swarm --network host --user "$ids" --cap-drop ALL \
        --security-opt no-new-privileges --read-only --pull never --log-driver none \
        --mount "type=bind,source=$kit,target=/opt/mlstack-swarm,readonly" \
        --mount "type=bind,source=$work,target=/swarm" $served \
        --env PYTHONPATH=/opt/mlstack-swarm --env PYTHONDONTWRITEBYTECODE=1 \
        --entrypoint "$python" "$image" /opt/mlstack-swarm/swarm_peer.py "$@"
    ;;
*)
    echo "swarm.sh: unknown command $command" >&2
    exit 2
    ;;
esac
