#!/usr/bin/env bash
# CI's container check: install podman (as root, with apt) if needed, make the Debian base
# image, build the CPU image, and run tests/test_containers.py (the image on its own, then the
# compose deployment under podman-compose). Prints what each part took.
# Usage: bash docker/ci-containers.sh   (from any directory; after `make test` made .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
TOOLS="${GSP_CONTAINER_TOOLS:-.cache/containers}"
IMAGE=localhost/gsp-retrieval:cpu
export CONTAINERS_CONF="$PWD/docker/containers.conf"
timings=()

timed() {  # timed LABEL COMMAND...: run it, remember how long it took
    local label="$1" started=$SECONDS
    shift
    "$@"
    timings+=("$label: $((SECONDS - started)) s")
}

install_podman() {
    if command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null; then
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
}

install_compose() {
    if [ ! -x "$TOOLS/venv/bin/podman-compose" ]; then
        python3 -m venv "$TOOLS/venv"
        "$TOOLS/venv/bin/python" -m pip install --quiet podman-compose
    fi
}

# The PyTorch CPU index gives the lean CPU image; where it cannot be reached (these machines
# reach only PyPI), torch comes from pip's own indexes: PyPI's CUDA build, about 5 GB larger.
if [ -z "${TORCH_INDEX_URL+set}" ]; then
    if "$PYTHON" -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/", timeout=10)' 2>/dev/null; then
        export TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
    else
        echo "containers: the PyTorch CPU index is unreachable; the CPU image gets PyPI's torch"
        export TORCH_INDEX_URL=
    fi
fi

timed "install podman" install_podman
timed "Debian base image" bash docker/debian-base.sh
timed "build $IMAGE" bash docker/build-image.sh cpu --quiet
timed "install podman-compose" install_compose
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "containers: $IMAGE is $((size / 1000000)) MB"
status=0
GSP_CONTAINER_IMAGE="$IMAGE" GSP_PODMAN_COMPOSE="$TOOLS/venv/bin/podman-compose" \
    timed "container tests" "$PYTHON" -m pytest -p no:cacheprovider -rs -m container \
    tests/test_containers.py || status=$?
printf 'containers: %s\n' "${timings[@]}"
exit "$status"
