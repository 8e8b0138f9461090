#!/bin/sh
# What an image sent to this host may leave out: the layers of every image on the host, and whether its
# engine keeps images in the classic store, whose `docker load` reads no layer it already holds.
# Asked only of a host an image is sent to (`docker info` takes a while).
set -eu
docker images -q --no-trunc | sort -u | xargs -r docker image inspect --format 'layers {{range .RootFS.Layers}}{{.}} {{end}}'
docker info --format 'store {{json .DriverStatus}}'
