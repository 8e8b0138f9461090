#!/bin/sh
# The host's NVIDIA GPUs and how docker gives containers GPUs. Prints nothing on a host without
# nvidia-smi; else "gpu <line>" for each line nvidia-smi prints (a broken driver's complaint too:
# the parser fails the host quoting it), then "runtimes" and docker's runtimes by name, then "docker runtime",
# "docker cdi" or "docker none".
# A driver too old to know a field of QUERY is asked BASIC_QUERY instead.
# usage: gpu_probe.sh QUERY BASIC_QUERY
set -u
query=$1
basic_query=$2
command -v nvidia-smi >/dev/null || exit 0
if ! lines=$(nvidia-smi --query-gpu="$query" --format=csv,noheader,nounits 2>&1); then
    case $lines in
        *"is not a valid field"*) lines=$(nvidia-smi --query-gpu="$basic_query" --format=csv,noheader,nounits 2>&1) ;;
    esac
fi
printf '%s\n' "$lines" | sed 's/^/gpu /'
# shellcheck disable=SC2016 # a docker template, not shell
runtimes=$(docker info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null || true)
echo "runtimes $runtimes"
case " $runtimes " in
    *" nvidia "*) echo "docker runtime"; exit 0 ;;
esac
if command -v nvidia-container-runtime-hook >/dev/null; then echo "docker runtime"; exit 0; fi
for spec in /etc/cdi/*.yaml /etc/cdi/*.json /var/run/cdi/*.yaml /var/run/cdi/*.json; do
    if [ -f "$spec" ] && grep -qs 'nvidia.com/gpu' "$spec"; then echo "docker cdi"; exit 0; fi
done
echo "docker none"
