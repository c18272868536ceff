#!/usr/bin/env bash
# Build localhost/gsp-retrieval:TARGET with podman on a machine like the CI's: FROM the local
# Debian base (docker/debian-base.sh), with the host's pip settings and local wheel folders
# (docker/pip_build_args.py) and the host network.
# Usage: docker/build-image.sh cpu|cuda [more podman build options]
# TORCH_INDEX_URL (environment) overrides the CPU target's torch index; set it empty to take
# torch from pip's configured indexes where the PyTorch index is unreachable.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${1:?usage: docker/build-image.sh cpu|cuda [podman build options]}"
shift
BASE_IMAGE="${BASE_IMAGE:-localhost/debian:bookworm-slim}"
PYTHON="${PYTHON:-.venv/bin/python}"

mapfile -t pip_options < <("$PYTHON" docker/pip_build_args.py)
torch_option=()
if [ -n "${TORCH_INDEX_URL+set}" ]; then
    torch_option=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
fi
# --format docker keeps the HEALTHCHECK (the OCI format has none); --layers reuses cached steps.
podman build --format docker --layers --network host \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TARGET=$TARGET" \
    "${torch_option[@]}" "${pip_options[@]}" \
    -t "localhost/gsp-retrieval:$TARGET" "$@" .
