#!/usr/bin/env bash
# The quick start's cost on this machine, from a fresh clone of the current commit:
#   1. the install alone, pip vs the default (uv with pip's settings), side by side: fresh venv,
#      empty uv and pip caches, then the time to import the heavy packages;
#   2. `make serve` from a fresh clone (empty uv cache) until GET /readyz answers 200
#      (target: 180 s on 2 CPU cores), then two later starts (target: 20 s).
# Usage: bash bench/first_start.sh [PORT]   (needs python3.11, curl, ~20 GB free under /tmp)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${1:-8019}"
SCRATCH="$(mktemp -d /tmp/gsp-first-start.XXXXXX)"
trap 'pkill -f "port $PORT" || true; rm -rf "$SCRATCH"' EXIT
echo "machine: $(uname -m), $(nproc) CPUs, $(python3.11 --version), commit $(git -C "$REPO" rev-parse --short HEAD)"

seconds_since() { printf "%.1f" "$(echo "$(date +%s.%N) - $1" | bc)"; }

wait_ready() {  # seconds from $1 until /readyz answers, or fail after 600 s
    for _ in $(seq 1 3000); do
        if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; then seconds_since "$1"; return; fi
        sleep 0.2
    done
    echo "no /readyz within 600 s" >&2
    return 1
}

git clone -q "$REPO" "$SCRATCH/install"
for installer in pip uv; do
    rm -rf "$SCRATCH/install/.venv" ~/.cache/uv ~/.cache/pip
    python3.11 -m venv "$SCRATCH/install/.venv"
    started=$(date +%s.%N)
    (cd "$SCRATCH/install" && GSP_INSTALLER=$installer .venv/bin/python tools/install.py -e . \
        >"$SCRATCH/install-$installer.log" 2>&1)
    installed=$(seconds_since "$started")
    started=$(date +%s.%N)
    "$SCRATCH/install/.venv/bin/python" -c "import torch, timm, faiss, fastapi, torchvision"
    echo "install with $installer: ${installed} s; imports afterwards: $(seconds_since "$started") s"
done
rm -rf "$SCRATCH/install" ~/.cache/uv

git clone -q "$REPO" "$SCRATCH/serve"
cd "$SCRATCH/serve"
for start in first later later; do
    started=$(date +%s.%N)
    PYTHON=python3.11 PORT=$PORT make serve >"$SCRATCH/serve-$start.log" 2>&1 &
    echo "$start start, make serve to /readyz: $(wait_ready "$started") s"
    pkill -f "port $PORT" || true
    wait || true
done
