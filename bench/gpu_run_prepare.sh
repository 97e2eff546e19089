#!/usr/bin/env bash
# Prepares the device machine's run of bench/gpu_suite.py (issue 17); run here, in the repository root's checkout.
#
# The device image (Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, grpcio, protobuf, psutil, nvidia-ml-py)
# lacks grpcio-health-checking (healthd's gRPC health service), and its grpcio and protobuf may be older than
# the committed stubs in health/proto require (grpcio >= 1.85.1, protobuf >= 7.35.1): these wheels travel in
# dist/gpu-wheels (ignored by git; `carry` it) with the commit they were prepared at. Nothing else is needed there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf dist/gpu-wheels
mkdir -p dist/gpu-wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d dist/gpu-wheels \
    grpcio==1.85.3 grpcio-health-checking==1.85.1 protobuf==7.36.2
git rev-parse --short HEAD >dist/gpu-wheels/COMMIT
du -sh dist/gpu-wheels
