#!/bin/sh
# Make STAGE, this run's own staging directory in COMPOSE_DIR, for the project's upload: 0700 (root alone
# reads the .env it will hold) and a new name (mkdir fails on one that exists), so a step that a lost
# connection of an earlier run left running never works in it. install_project.sh removes what earlier
# runs left, under the compose directory's lock.
# usage: stage_project.sh COMPOSE_DIR STAGE
set -eu
mkdir -m 0700 -- "$1/$2"
