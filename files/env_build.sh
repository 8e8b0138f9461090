#!/bin/sh
# The ML env build, run in the bootstrap container: pip --user installs the requirements, then torch
# (if the env has it) reports its version, CUDA version and build arch list to /build/torch.json.
set -eu
python3 -m pip install --user --no-warn-script-location -r /build/requirements.txt
python3 /build/torch_info.py > /build/torch.json
