#!/usr/bin/env bash
# Downloads the peers' pure-Python wheels (the benchmark providers gpu.sh installs from .whl/)
# into .whl/ (git-ignored), on a machine with a package registry, before a GPU run:
#
#   bash scripts/peer_wheels.sh && then carry ".whl" in the device call running scripts/gpu.sh
#
# Versions are the ones issue 14 names. --no-deps: their own needs (torch, triton) are on the
# GPU machine already.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl \
    liger-kernel==0.8.5 inf-cl==1.2.1 siglip-kernel==0.1.2
# pytest-xdist (and execnet, its transport): gpu-tests runs its first, cold-cache Triton
# compilations in several processes where it is importable
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl pytest-xdist execnet
ls -1 .whl
