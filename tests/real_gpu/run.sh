#!/bin/bash
# On a machine with real NVIDIA GPUs (the `device` machine of a session that is lent one): capture
# nvidia-smi's output as fixtures and run the GPU smoke program and the gate's plan-time checks with
# that machine's own Python and torch. Not part of `make test` (no GPU here); its output is recorded
# in the README ("GPU checks on a real GPU").
# usage: tests/real_gpu/run.sh OUT_DIR
set -u
out=${1:?usage: run.sh OUT_DIR}
mkdir -p "$out"
query=index,uuid,name,memory.total,driver_version,compute_cap,mig.mode.current
section() { printf '\n=== %s\n' "$*"; }

section "machine"
uname -a; date -u; nproc
section "nvidia-smi (plain)"
nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt"
section "nvidia-smi -L"
nvidia-smi -L 2>&1
section "query: $query"
nvidia-smi --query-gpu="$query" --format=csv,noheader,nounits 2>&1 | tee "$out/nvidia-smi-query.txt"
echo "exit ${PIPESTATUS[0]}"
section "query with header and units"
nvidia-smi --query-gpu="$query" --format=csv 2>&1
section "a field this driver does not know (what an old driver prints for compute_cap)"
nvidia-smi --query-gpu=index,no_such_field --format=csv,noheader,nounits 2>&1 | tee "$out/nvidia-smi-bad-field.txt"
echo "exit ${PIPESTATUS[0]}"
section "docker and container runtime"
command -v docker nvidia-container-runtime nvidia-container-runtime-hook nvidia-ctk 2>&1
docker info --format '{{json .Runtimes}} {{json .CDISpecDirs}}' 2>&1 | head -3
find /etc/cdi /var/run/cdi -maxdepth 1 2>&1 | head
section "pythons"
for python in python3 python /opt/conda/bin/python /usr/local/bin/python3; do
    command -v "$python" >/dev/null && echo "$python: $("$python" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.__file__)' 2>&1 | tail -1)"
done
python=python3
for candidate in python3 python /opt/conda/bin/python /usr/local/bin/python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import torch' 2>/dev/null; then python=$candidate; break; fi
done
echo "using $python"
section "plan-time checks and smoke test with this machine's torch"
"$python" tests/real_gpu/checks.py "$out/nvidia-smi-query.txt"
echo "exit $?"
