#!/bin/sh
# `docker compose down` of the project named PROJECT (compose finds its containers by their labels): its
# containers and networks go, its volumes stay.
# usage: bring_down.sh COMPOSE_DIR PROJECT
set -eu
cd "$1"
docker compose -p "$2" down --remove-orphans
